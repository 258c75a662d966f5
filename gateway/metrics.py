"""Prometheus metrics: ``model_gateway_*``, one registry per gateway.

Counters and histograms move on events (requests, cold starts, cutovers, evictions,
restarts, poll failures, webhooks); states, in-flight counts and memory are read from
the pool when Prometheus scrapes, so the request path only pays for what it counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runners import Endpoint, PoolEvents, RunnerPool, State

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COLD_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # `_created` series double the output and no alert uses them


class _PoolCollector(Collector):
    """Gauges computed from the pool at scrape time."""

    def __init__(self, pool: RunnerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily("model_gateway_runner_state",
                                  "1 for the endpoint's current state", labels=["name", "alias",
                                                                                "state"])
        in_flight = GaugeMetricFamily("model_gateway_requests_in_flight",
                                      "Requests bound to the endpoint's runners",
                                      labels=["name", "alias"])
        waiting = GaugeMetricFamily("model_gateway_requests_waiting",
                                    "Requests waiting for a runner of the endpoint (queued)",
                                    labels=["name", "alias"])
        memory = GaugeMetricFamily("model_gateway_runner_memory_bytes",
                                   "Memory (PSS) of the endpoint's serving runner",
                                   labels=["name", "alias", "version"])
        share = GaugeMetricFamily("model_gateway_rollout_share",
                                  "Percent of the endpoint's traffic on the version rolling out",
                                  labels=["name", "alias", "version"])
        for ep in self.pool.endpoints.values():
            name, alias = ep.spec.name, ep.spec.alias
            rollout = ep.cutover.rollout if ep.cutover else None
            if rollout is not None:
                share.add_metric([name, alias, rollout.version or "-"], rollout.share)
            for s in State:
                state.add_metric([name, alias, s.value], 1.0 if ep.state is s else 0.0)
            green = ep.cutover.runner if ep.cutover else None
            runners = [r for r in (ep.runner, green) if r is not None]
            in_flight.add_metric([name, alias], float(sum(r.in_flight for r in runners)))
            waiting.add_metric([name, alias], float(ep.waiters))
            if ep.runner is not None:
                memory.add_metric([name, alias, ep.runner.version or "-"],
                                  float(ep.runner.memory))
        yield state
        yield in_flight
        yield waiting
        yield memory
        yield share
        live = GaugeMetricFamily("model_gateway_live_runners", "Runner processes alive")
        live.add_metric([], float(len(self.pool.runners)))
        yield live
        total = GaugeMetricFamily("model_gateway_pool_memory_bytes",
                                  "Memory (PSS) of all runners together")
        total.add_metric([], float(self.pool.memory))
        yield total


class GatewayMetrics(PoolEvents):
    """The gateway's metrics; also the pool's event observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("model_gateway_requests_total", "Proxied requests by status class",
                                ["name", "alias", "status_class"], registry=r)
        self.latency = Histogram("model_gateway_request_duration_seconds",
                                 "Gateway-side request latency, queueing and cold start included",
                                 ["name", "alias"], buckets=LATENCY_BUCKETS, registry=r)
        self.cold_starts = Counter("model_gateway_cold_starts_total", "Cold starts by outcome",
                                   ["name", "alias", "outcome"], registry=r)
        self.cold_start_seconds = Histogram("model_gateway_cold_start_duration_seconds",
                                            "Time from first request to a ready runner",
                                            ["name", "alias"], buckets=COLD_BUCKETS, registry=r)
        self.cutovers = Counter("model_gateway_cutovers_total", "Blue-green cutovers by outcome",
                                ["name", "alias", "outcome"], registry=r)
        self.evictions = Counter("model_gateway_evictions_total", "Runners evicted, by reason",
                                 ["name", "alias", "reason"], registry=r)
        self.restarts = Counter("model_gateway_runner_restarts_total",
                                "Runners that exited or hung unexpectedly", ["name", "alias"],
                                registry=r)
        self.poll_failures = Counter("model_gateway_registry_poll_failures_total",
                                     "Failed registry re-resolutions", registry=r)
        self.webhooks = Counter("model_gateway_webhook_deliveries_total",
                                "Registry webhook deliveries", ["result"], registry=r)
        self.peer_relays = Counter("model_gateway_peer_relays_total",
                                   "Relays to and from peer gateways, by direction and result",
                                   ["direction", "result"], registry=r)
        self.client_errors = Counter("model_gateway_client_errors_total",
                                     "Requests and connections refused or cut at the HTTP "
                                     "edge, by reason", ["reason"], registry=r)
        self.batch_size = Histogram("model_gateway_batch_size",
                                    "Requests per predict call, on endpoints that batch",
                                    ["name", "alias"], buckets=BATCH_BUCKETS, registry=r)
        self.batched = Counter("model_gateway_batched_requests_total",
                               "Requests answered from a merged predict call",
                               ["name", "alias"], registry=r)
        self.batch_fallbacks = Counter("model_gateway_batch_fallbacks_total",
                                       "Requests of a batching endpoint served alone instead "
                                       "of merged, by reason", ["name", "alias", "reason"],
                                       registry=r)
        self.split_requests = Counter("model_gateway_split_requests_total",
                                      "Requests a routing endpoint sent to each of its arms",
                                      ["name", "alias", "arm"], registry=r)
        self.shadow_requests = Counter("model_gateway_shadow_requests_total",
                                       "Copies of predictions sent to the endpoint's shadow, "
                                       "by outcome", ["name", "alias", "outcome"], registry=r)
        self.shadow_seconds = Histogram("model_gateway_shadow_duration_seconds",
                                        "Time the shadow took to answer a copy",
                                        ["name", "alias"], buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.inference_log = Counter("model_gateway_inference_log_lines_total",
                                     "Inference log lines written, or dropped when the disk "
                                     "could not keep up", ["result"], registry=r)
        self._split_children: dict[tuple[tuple[str, str], tuple[str, str]], Any] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def watch(self, pool: RunnerPool) -> None:
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the request path -----------------------------------------------------------------
    def observe_request(self, name: str, alias: str, status: int, seconds: float) -> None:
        key = (name, alias, status // 100)
        children = self._request_children.get(key)
        if children is None:  # label lookups once per endpoint and class, not per request
            children = (self.requests.labels(name, alias, f"{status // 100}xx"),
                        self.latency.labels(name, alias))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def split_request(self, key: tuple[str, str], arm: tuple[str, str]) -> None:
        child = self._split_children.get((key, arm))
        if child is None:
            child = self._split_children[(key, arm)] = self.split_requests.labels(
                key[0], key[1], f"{arm[0]}/{arm[1]}")
        child.inc()

    def inference_log_lines(self, result: str, count: int) -> None:
        """Called from the log's writer thread too: prometheus counters are thread-safe."""
        self.inference_log.labels(result).inc(count)

    def client_error(self, reason: str) -> None:
        """The edge refused a request or dropped a connection (a limit or a deadline)."""
        self.client_errors.labels(reason).inc()

    # -- PoolEvents -----------------------------------------------------------------------
    def cold_start(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        self.cold_starts.labels(ep.spec.name, ep.spec.alias, "ok" if ok else "failed").inc()
        if ok:
            self.cold_start_seconds.labels(ep.spec.name, ep.spec.alias).observe(seconds)

    def cutover(self, ep: Endpoint, ok: bool) -> None:
        self.cutovers.labels(ep.spec.name, ep.spec.alias, "succeeded" if ok else "failed").inc()

    def rolled_back(self, ep: Endpoint) -> None:
        self.cutovers.labels(ep.spec.name, ep.spec.alias, "rolled_back").inc()

    def eviction(self, ep: Endpoint, reason: str) -> None:
        self.evictions.labels(ep.spec.name, ep.spec.alias, reason).inc()

    def restart(self, ep: Endpoint) -> None:
        self.restarts.labels(ep.spec.name, ep.spec.alias).inc()

    def poll_failure(self, ep: Endpoint) -> None:
        self.poll_failures.inc()

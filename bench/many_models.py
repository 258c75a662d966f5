"""Many models, few runner slots: random traffic over 40 endpoints with a pool of 4.

    .venv/bin/python bench/many_models.py [--duration 60] [--endpoints 40]

Builds a temporary registry with ``const`` v1 (predicts 1.0) and declares endpoints
``const/m0`` … ``const/m39`` (all ``models:/const/1``, launcher fork) in a gateway with
``max_runners: 4``, ``memory_limit: 2GiB`` and ``idle_timeout: 30s``. wrk (1 thread,
4 connections; ``--connections`` is ignored, see ``--clients``) sends every request to
a random endpoint; its Lua script counts answers by status, telling the documented 503
codes (``pool_busy``, ``runner_unavailable``) apart. Cold starts and evictions come from
``/metrics`` before and after, the peak pool memory from sampling ``/metrics`` every
second. After the gateway is stopped, no runner process may be left.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    GatewayService,
    Options,
    add_options,
    ensure_tools,
    exit_on_sigterm,
    markdown_table,
    options_from,
    process_tree,
    save_result,
    stage,
    wrk_json,
)
from bench.probes import by_label, leftovers, metric, mib, predict, scrape, write_config
from bench.registry import constant_registry

BODY = '{"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}'
ENDPOINTS = 40
CLIENTS = 4
POOL = {"max_runners": 4, "memory_limit": "2GiB", "idle_timeout": "30s"}

WRK_SCRIPT = """
local endpoints = {count}
local body = [==[{body}]==]
local headers = {{["Content-Type"] = "application/json"}}
local threads = {{}}
n2xx, busy, unavailable, other503, other = 0, 0, 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + tonumber(tostring({{}}):match("0x(%x+)") or "0", 16) % 100000)
end

function request()
  local path = string.format("/models/const/m%d/invocations", math.random(0, endpoints - 1))
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, text)
  if status >= 200 and status < 300 then
    n2xx = n2xx + 1
  elseif status == 503 and text:find("pool_busy", 1, true) then
    busy = busy + 1
  elseif status == 503 and text:find("runner_unavailable", 1, true) then
    unavailable = unavailable + 1
  elseif status == 503 then
    other503 = other503 + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local c = {{n2xx = 0, busy = 0, unavailable = 0, other503 = 0, other = 0}}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + (t:get(k) or 0) end
  end
  local e = summary.errors
  io.write(string.format(
    "MANY_RESULT {{\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, "
    .. "\\"p99_us\\": %d, \\"ok\\": %d, \\"pool_busy\\": %d, \\"runner_unavailable\\": %d, "
    .. "\\"other_503\\": %d, \\"other\\": %d, \\"socket_errors\\": %d, \\"timeouts\\": %d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    c.n2xx, c.busy, c.unavailable, c.other503, c.other,
    e.connect + e.read + e.write, e.timeout))
end
"""


@dataclass
class Outcome:
    wrk: dict[str, int]
    cold_starts: dict[str, float]
    evictions: dict[str, float]
    peak_pool_memory: float
    peak_live_runners: float
    runner_pids: set[int]
    left: list[int]


def build_registry(root: Path) -> str:
    """``const`` v1 (predicts 1.0). Returns the registry's URI."""
    return constant_registry(root, "bench-many-models", ["const"], (1.0,))[0]


class Sampler(threading.Thread):
    """Scrapes /metrics every second; keeps the peaks and the runner pids it saw."""

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.stopped = threading.Event()
        self.peak_memory = 0.0
        self.peak_live = 0.0
        self.pids: set[int] = set()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                samples = scrape(self.gateway.url, timeout=5)
                self.pids.update(p for p in process_tree(self.gateway.pid)
                                 if p != self.gateway.pid)
            except OSError:
                continue
            self.peak_memory = max(self.peak_memory,
                                   metric(samples, "model_gateway_pool_memory_bytes"))
            self.peak_live = max(self.peak_live, metric(samples, "model_gateway_live_runners"))


def run_load(url: str, work: Path, *, endpoints: int, clients: int,
             duration: float) -> dict[str, int]:
    script = work / "many-models.lua"
    script.write_text(WRK_SCRIPT.format(count=endpoints, body=BODY))
    return wrk_json(script, url, marker="MANY_RESULT", duration=duration,
                    connections=clients, timeout="60s")


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def run(options: Options, *, endpoints: int = ENDPOINTS, clients: int = CLIENTS,
        log_level: str = "INFO") -> str:
    """Run the section (``options.duration`` seconds of load); returns its markdown report."""
    ensure_tools({"wrk": "wrk"})
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        work = Path(tmp)
        with stage("building the registry (const v1)"):
            uri = build_registry(work)
        config = write_config(work / "gateway.yaml", {
            "tracking_uri": uri, "access_log": False, "pool": POOL,
            "defaults": {"launcher": "fork", "poll_interval": "10m"},
            "endpoints": [{"name": "const", "alias": f"m{i}", "model_uri": "models:/const/1"}
                          for i in range(endpoints)]})
        with stage("starting the gateway"):
            gateway = GatewayService(config, work / "gateway.log", log_level=log_level)
            gateway.start()
        try:
            body = BODY.encode()
            with stage("warming the zygote through const/m0"):
                status, _ = predict(f"{gateway.url}/models/const/m0/invocations", body,
                                    timeout=300)
                if status != 200:
                    raise RuntimeError(f"const/m0 answered {status}:\n{gateway.tail()}")
            before = scrape(gateway.url)
            sampler = Sampler(gateway)
            sampler.start()
            with stage(f"wrk, {clients} connections, {options.duration:.0f}s, "
                       f"{endpoints} endpoints at random"):
                result = run_load(gateway.url, work, endpoints=endpoints, clients=clients,
                                  duration=options.duration)
            sampler.stopped.set()
            sampler.join(10)
            after = scrape(gateway.url)
            gateway.check_alive()
            pids = sampler.pids | {p for p in process_tree(gateway.pid) if p != gateway.pid}
        finally:
            with stage("stopping the gateway"):
                gateway.stop()
        outcome = Outcome(
            wrk=result,
            cold_starts=_delta(by_label(after, "model_gateway_cold_starts_total", "outcome"),
                               by_label(before, "model_gateway_cold_starts_total", "outcome")),
            evictions=_delta(by_label(after, "model_gateway_evictions_total", "reason"),
                             by_label(before, "model_gateway_evictions_total", "reason")),
            peak_pool_memory=sampler.peak_memory, peak_live_runners=sampler.peak_live,
            runner_pids=pids, left=leftovers(pids))
    return render(options, outcome, endpoints, clients)


def _counts(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(values.items())) or "0"


def render(options: Options, outcome: Outcome, endpoints: int, clients: int) -> str:
    w = outcome.wrk
    seconds = w["duration_us"] / 1e6
    rows = [
        ["requests sent (wrk)", f"{w['requests']:,}"],
        ["served (2xx)", f"{w['ok']:,} ({w['ok'] / seconds:,.1f}/s)"],
        ["503 pool_busy", f"{w['pool_busy']:,}"],
        ["503 runner_unavailable", f"{w['runner_unavailable']:,}"],
        ["503 other", f"{w['other_503']:,}"],
        ["other statuses", f"{w['other']:,}"],
        ["socket errors / timeouts", f"{w['socket_errors']} / {w['timeouts']}"],
        ["latency p50 / p99 ms", f"{w['p50_us'] / 1000:.1f} / {w['p99_us'] / 1000:.1f}"],
        ["cold starts (by outcome)", _counts(outcome.cold_starts)],
        ["evictions (by reason)", _counts(outcome.evictions)],
        ["peak pool memory MiB (PSS, 1 s samples)", mib(outcome.peak_pool_memory)],
        ["peak live runners", f"{outcome.peak_live_runners:.0f}"],
        ["gateway children seen / left after stop",
         f"{len(outcome.runner_pids)} / {len(outcome.left)}"
         + (f" ({', '.join(map(str, outcome.left))})" if outcome.left else "")],
    ]
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    pool = ", ".join(f"{k} {v}" for k, v in POOL.items())
    return (f"### Many models, few slots — {when}\n\n"
            f"{endpoints} endpoints (`models:/const/1`, launcher fork), pool: {pool}; wrk 1 "
            f"thread, {clients} connections, {seconds:.0f} s, a random endpoint per request "
            "(zygote warmed first through const/m0). Counts from wrk's Lua script; cold "
            "starts and evictions from `/metrics` before → after. "
            f"{os.cpu_count()} CPUs, shared machine (noise possible).\n\n"
            + markdown_table(["measure", "value"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/many_models.py",
                                     description=__doc__.split("\n")[0])
    add_options(parser)
    parser.set_defaults(duration=60.0)
    parser.add_argument("--endpoints", type=int, default=ENDPOINTS)
    parser.add_argument("--clients", type=int, default=CLIENTS, help="wrk connections")
    parser.add_argument("--log-level", default="INFO", help="the gateway's log level")
    args = parser.parse_args(argv)
    if args.endpoints < 1 or args.clients < 1:
        parser.error("--endpoints and --clients must be positive")
    exit_on_sigterm()
    report = run(options_from(args), endpoints=args.endpoints, clients=args.clients,
                 log_level=args.log_level)
    print(report)
    print(f"saved to {save_result('many_models', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shadow traffic: a share of an endpoint's predictions is also sent to another endpoint,
whose answers are compared with the primary's and discarded.

    - {name: churn, alias: champion, shadow: {to: challenger, percent: 25, tolerance: 1e-6}}

The caller never waits for the shadow and never sees its errors: once the primary's
answer is written, a copy (request body, content type, the primary's status and body) is
put on the shadow's lane, a bounded queue served by one task per worker of the shadow
endpoint. A full queue drops the copy (counted), so a slow or failing shadow costs the
primary nothing but the copy. The sample follows the golden-ratio sequence, so the
share sent matches ``percent`` closely.

Outcomes (``model_gateway_shadow_requests_total{outcome}``): ``match`` (same status, and
for 200 the same predictions, numbers within ``tolerance``, relative or absolute),
``mismatch``, ``error`` (the shadow failed: a 5xx, no runner, a timeout) and ``dropped``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runners import Endpoint, RunnerPool
from runners.spread import Spread

from .metrics import GatewayMetrics
from .splits import Key

log = logging.getLogger("model_gateway.shadow")

QUEUE = 64  # copies waiting for the shadow, at most; more are dropped


@dataclass(frozen=True)
class ShadowSpec:
    to: Key
    fraction: float  # of the primary's predictions, 0..1
    tolerance: float


@dataclass(frozen=True, slots=True)
class _Copy:
    content_type: bytes
    body: bytes
    status: int
    answer: bytes
    request_id: bytes


class _Lane:
    """One primary endpoint's shadow: its sampler, queue, workers and tallies."""

    def __init__(self, ep: Endpoint, spec: ShadowSpec) -> None:
        self.ep = ep
        self.spec = spec
        self.spread = Spread()
        self.queue: asyncio.Queue[_Copy] = asyncio.Queue(QUEUE)
        self.tasks: list[asyncio.Task[None]] = []
        self.counts = {"match": 0, "mismatch": 0, "error": 0, "dropped": 0}
        ep.shadow_stats = self.stats()

    def sampled(self) -> bool:
        return self.spread.sampled(self.spec.fraction)

    def stats(self) -> dict[str, Any]:
        compared = self.counts["match"] + self.counts["mismatch"]
        return {"to": f"{self.spec.to[0]}/{self.spec.to[1]}",
                "percent": round(self.spec.fraction * 100, 4),
                "tolerance": self.spec.tolerance, **self.counts,
                "agreement": round(self.counts["match"] / compared, 4) if compared else None}


Outcome = Callable[[Endpoint, bytes, Key, str, float], None]


class ShadowTraffic:
    def __init__(self, pool: RunnerPool, metrics: GatewayMetrics,
                 on_outcome: Outcome | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self._on_outcome = on_outcome  # (primary, request id, shadow, outcome, seconds)
        self._lanes: dict[Key, _Lane] = {}

    def offer(self, ep: Endpoint, spec: ShadowSpec, content_type: bytes | None, body: bytes,
              status: int, answer: bytes, request_id: bytes = b"") -> None:
        """The primary answered ``status``/``answer``: send a copy to the shadow, when
        this request is in its share and its queue has room. Never waits."""
        lane = self._lanes.get(ep.key)
        if lane is None or lane.ep is not ep or lane.spec != spec:
            lane = self._lanes[ep.key] = self._open(ep, spec, lane)
        if not lane.sampled():
            return
        try:
            lane.queue.put_nowait(_Copy(content_type or b"application/json", body, status,
                                        answer, request_id))
        except asyncio.QueueFull:
            self._count(lane, "dropped")

    async def close(self) -> None:
        lanes, self._lanes = list(self._lanes.values()), {}
        tasks = [task for lane in lanes for task in lane.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _open(self, ep: Endpoint, spec: ShadowSpec, old: _Lane | None) -> _Lane:
        if old is not None:  # new settings (a reload): the old lane's copies are dropped
            for task in old.tasks:
                task.cancel()
        lane = _Lane(ep, spec)
        shadow = self.pool.endpoints.get(spec.to)
        workers = shadow.spec.workers if shadow is not None else 1
        loop = asyncio.get_running_loop()
        lane.tasks = [loop.create_task(self._work(lane), name=f"shadow-{ep.label}")
                      for _ in range(workers)]
        return lane

    def _count(self, lane: _Lane, outcome: str) -> None:
        lane.counts[outcome] += 1
        lane.ep.shadow_stats = lane.stats()
        self.metrics.shadow_requests.labels(lane.ep.spec.name, lane.ep.spec.alias,
                                            outcome).inc()

    async def _work(self, lane: _Lane) -> None:
        while True:
            copy = await lane.queue.get()
            started = time.perf_counter()
            try:
                status, answer = await self._call(lane.spec.to, copy)
                outcome = compare(copy.status, copy.answer, status, answer,
                                  lane.spec.tolerance)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shadow's failure is only counted
                log.debug("shadow call to %s failed: %s", lane.spec.to, exc)
                outcome = "error"
            seconds = time.perf_counter() - started
            self.metrics.shadow_seconds.labels(lane.ep.spec.name, lane.ep.spec.alias
                                               ).observe(seconds)
            self._count(lane, outcome)
            if self._on_outcome is not None:
                self._on_outcome(lane.ep, copy.request_id, lane.spec.to, outcome, seconds)

    async def _call(self, to: Key, copy: _Copy) -> tuple[int, bytes]:
        shadow = self.pool.endpoints.get(to)
        if shadow is None:
            raise LookupError(f"{to[0]}/{to[1]} is not declared")
        runner = await self.pool.acquire(shadow)
        try:
            return await runner.client.request(
                "POST", "/invocations", body=copy.body,
                headers=[(b"content-type", copy.content_type)],
                timeout=shadow.spec.request_timeout)
        finally:
            self.pool.release(shadow, runner)


def compare(status: int, answer: bytes, shadow_status: int, shadow_answer: bytes,
            tolerance: float) -> str:
    """``match``, ``mismatch`` or ``error`` for a shadow's answer against the primary's."""
    if shadow_status >= 500:
        return "error"
    if status != shadow_status:
        return "mismatch"
    if status != 200 or answer == shadow_answer:
        return "match"
    try:
        ours, theirs = json.loads(answer), json.loads(shadow_answer)
        return "match" if _close(ours, theirs, tolerance) else "mismatch"
    except (ValueError, RecursionError):
        return "mismatch"


def _close(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance) or \
            (a != a and b != b)  # NaN agrees with NaN
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    return bool(a == b)

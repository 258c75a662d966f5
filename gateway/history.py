"""What the status page draws: a few minutes of figures per endpoint and for the pool, and
the pool's recent events, kept in the gateway's memory and bounded.

Requests are counted as they finish (:meth:`History.observe_request`, O(1) on the request
path); every ``tick`` seconds the counts become one point per endpoint (rate, p50, p99,
error share) and one for the pool (live runners, memory, cold starts, evictions,
cutovers). ``points`` of them are kept: with the defaults, six minutes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from typing import Any

from runners import Endpoint, PoolEvents, RunnerPool

TICK = 5.0  # seconds per point
POINTS = 72  # points kept per series: six minutes at TICK
EVENTS = 200  # recent pool events kept for the timeline
SAMPLES = 512  # request durations kept per endpoint per tick for its quantiles


@dataclasses.dataclass
class _Window:
    """One endpoint's finished requests since the last tick."""

    count: int = 0
    errors: int = 0  # 5xx: what the gateway or the model failed, not what callers sent
    durations: list[float] = dataclasses.field(default_factory=list)

    def add(self, status: int, seconds: float) -> None:
        self.count += 1
        if status >= 500:
            self.errors += 1
        if len(self.durations) < SAMPLES:
            self.durations.append(seconds)
        else:  # a uniform sample of the window (reservoir), so quantiles stay honest
            slot = random.randrange(self.count)
            if slot < SAMPLES:
                self.durations[slot] = seconds


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class History(PoolEvents):
    """Series and events for the status page; also a pool event observer."""

    def __init__(self, *, tick: float = TICK, points: int = POINTS) -> None:
        self.pool: RunnerPool | None = None
        self.tick = tick
        self.points = points
        self._windows: dict[tuple[str, str], _Window] = {}
        # Per endpoint: [t, requests/s, p50 ms, p99 ms, 5xx share] (None where no request).
        self.series: dict[tuple[str, str], collections.deque[list[Any]]] = {}
        # The pool: [t, live runners, memory bytes, cold starts, evictions, cutovers].
        self.pool_series: collections.deque[list[Any]] = collections.deque(maxlen=points)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self.last_started: dict[tuple[str, str], float] = {}
        self._counts = {"cold_starts": 0, "evictions": 0, "cutovers": 0}
        self.started = time.time()

    def watch(self, pool: RunnerPool) -> None:
        """The pool whose endpoints and runners each point describes."""
        self.pool = pool

    # -- the request path -----------------------------------------------------------------
    def observe_request(self, name: str, alias: str, status: int, seconds: float) -> None:
        window = self._windows.get((name, alias))
        if window is None:
            window = self._windows[(name, alias)] = _Window()
        window.add(status, seconds)

    # -- PoolEvents -----------------------------------------------------------------------
    def _event(self, ep: Endpoint, kind: str, text: str) -> None:
        self.events.append({"t": time.time(), "endpoint": ep.label, "name": ep.spec.name,
                            "alias": ep.spec.alias, "kind": kind, "text": text})

    def cold_start(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        self._counts["cold_starts"] += 1
        if ok:
            self.last_started[ep.key] = time.time()
            self._event(ep, "start", f"version {ep.version} ready in {seconds:.2f} s")
        else:
            self._event(ep, "failure", f"start failed after {seconds:.1f} s")

    def cutover(self, ep: Endpoint, ok: bool) -> None:
        self._counts["cutovers"] += 1
        if ok:
            self.last_started[ep.key] = time.time()
            self._event(ep, "cutover", f"cut over to version {ep.version}")
        else:
            self._event(ep, "rollback",
                        f"cutover to version {ep.failed_version} failed: stays on {ep.version}")

    def rolled_back(self, ep: Endpoint) -> None:
        version, reason = ep.rolled_back or (None, "")
        self._event(ep, "rollback", f"version {version} rolled back: {reason}; "
                                    f"stays on {ep.version}")

    def eviction(self, ep: Endpoint, reason: str) -> None:
        self._counts["evictions"] += 1
        self._event(ep, "eviction", f"evicted ({reason})")

    def restart(self, ep: Endpoint) -> None:
        self._event(ep, "failure", "runner exited or hung")

    def poll_failure(self, ep: Endpoint) -> None:
        self._event(ep, "registry", "registry unreachable: still serving the last version")

    # -- points ---------------------------------------------------------------------------
    def sample(self, now: float | None = None) -> None:
        """Close the current windows into one point per endpoint and one for the pool."""
        if self.pool is None:
            return
        now = time.time() if now is None else now
        windows, self._windows = self._windows, {}
        for key in self.pool.endpoints:
            window = windows.get(key)
            point: list[Any] = [now, 0.0, None, None, None]
            if window is not None and window.count:
                ordered = sorted(window.durations)
                point = [now, round(window.count / self.tick, 3),
                         round(_quantile(ordered, 0.5) * 1000, 2),
                         round(_quantile(ordered, 0.99) * 1000, 2),
                         round(window.errors / window.count, 4)]
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = collections.deque(maxlen=self.points)
            series.append(point)
        for gone in set(self.series) - set(self.pool.endpoints):  # removed by a reload
            del self.series[gone]
        counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        self.pool_series.append([now, len(self.pool.runners), self.pool.memory,
                                 counts["cold_starts"], counts["evictions"],
                                 counts["cutovers"]])

    async def run(self) -> None:
        """Take a point every tick until cancelled (the gateway's lifespan owns the task)."""
        while True:
            await asyncio.sleep(self.tick)
            self.sample()

"""Housekeeping: idle eviction, memory accounting and health checks of live runners.

Once a second, runners idle for ``idle_timeout`` are evicted; every two seconds each
runner's process group is measured (PSS); every ``health_interval`` idle runners are
asked ``/ping``, and one that misses twice in a row is hung: killed and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from .endpoint import Endpoint
from .errors import TransportError
from .memory import group_memory
from .runner import Runner
from .spec import PoolSpec

log = logging.getLogger("model_gateway.pool")

HEALTH_TIMEOUT = 5.0  # an idle runner whose /ping takes longer than this is hung
HEALTH_STRIKES = 2  # consecutive failed pings before a runner is killed


class KeptPool(Protocol):
    """What housekeeping needs of the pool it keeps."""

    spec: PoolSpec
    endpoints: dict[tuple[str, str], Endpoint]
    runners: set[Runner]

    def evictable(self, ep: Endpoint) -> bool: ...

    async def evict(self, runner: Runner, *, reason: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...


class Housekeeping:
    def __init__(self, pool: KeptPool) -> None:
        self.pool = pool

    async def run(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(1)
            tick += 1
            self.evict_idle()
            if tick % 2 == 0:
                await self.measure()
            if tick % max(1, int(self.pool.spec.health_interval)) == 0:
                await self.check_health()

    def evict_idle(self) -> None:
        pool = self.pool
        if pool.spec.idle_timeout <= 0:
            return
        now = time.monotonic()
        for ep in pool.endpoints.values():
            runner = ep.runner
            if runner is not None and pool.evictable(ep) \
                    and now - runner.last_used >= pool.spec.idle_timeout:
                pool.spawn(pool.evict(runner, reason="idle"), f"evict-{runner.port}")

    async def measure(self) -> None:
        runners = [r for r in self.pool.runners if r.pid and r.is_alive]
        sizes = await asyncio.to_thread(lambda: [group_memory(r.pid or 0) for r in runners])
        for runner, size in zip(runners, sizes, strict=True):
            runner.memory = size
        for ep in self.pool.endpoints.values():
            if ep.runner is not None and ep.runner.memory:
                ep.last_memory = ep.runner.memory

    async def check_health(self) -> None:
        """Ping idle serving runners; one that stops answering is killed and replaced."""
        for ep in list(self.pool.endpoints.values()):
            runner = ep.runner
            if runner is None or runner.in_flight or not runner.serving:
                continue
            try:
                status, _ = await runner.client.request("GET", "/ping", timeout=HEALTH_TIMEOUT)
                healthy = status == 200
            except TransportError:
                healthy = runner.in_flight > 0  # busy meanwhile: not evidence of a hang
            runner.health_strikes = 0 if healthy else runner.health_strikes + 1
            if runner.health_strikes >= HEALTH_STRIKES and runner is ep.runner:
                log.error("endpoint %s: runner pid %s did not answer /ping within %.0fs "
                          "%d times; killing it", ep.label, runner.pid, HEALTH_TIMEOUT,
                          HEALTH_STRIKES)
                runner.kill(reason=f"runner hung: /ping did not answer within "
                                   f"{HEALTH_TIMEOUT:.0f}s")

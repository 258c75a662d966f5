"""The runner pool's capacity rules with real (tiny, MLflow-free) runner processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from runners.endpoint import Endpoint, State
from runners.errors import PoolBusy
from runners.events import PoolEvents
from runners.pool import RunnerPool
from runners.spec import EndpointSpec, PoolSpec
from tests import tiny_runner
from tests.conftest import owned_processes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def specs(*aliases: str) -> list[EndpointSpec]:
    return [EndpointSpec(name="tiny", alias=a, model_uri=f"/models/{a}") for a in aliases]


class Restarts(PoolEvents):
    def __init__(self) -> None:
        self.endpoints: list[str] = []

    def restart(self, ep: Endpoint) -> None:
        self.endpoints.append(ep.label)


@contextlib.asynccontextmanager
async def running(pool_spec: PoolSpec, *aliases: str) -> AsyncIterator[RunnerPool]:
    owner = f"fast-test-{uuid.uuid4().hex[:12]}"
    pool = RunnerPool(pool_spec, specs(*aliases), owner, events=Restarts(),
                      fork=tiny_runner.fork)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()
        assert owned_processes(owner) == []


async def test_a_new_runner_stays_for_its_minimum_residency() -> None:
    async with running(PoolSpec(max_runners=1, min_residency=1.0), "a", "b") as pool:
        a, b = pool.endpoints[("tiny", "a")], pool.endpoints[("tiny", "b")]
        first = await pool.acquire(a)
        pool.release(a, first)
        began = time.monotonic()
        second = await pool.acquire(b)  # the one slot is a's until it has stayed 1 s
        waited = time.monotonic() - began
        assert first.ready_at is not None and second.ready_at is not None
        assert second.ready_at - first.ready_at >= 1.0, waited
        assert a.state is State.COLD and not first.is_alive
        pool.release(b, second)


async def test_a_runner_that_requests_wait_for_is_not_evicted() -> None:
    async with running(PoolSpec(max_runners=1, min_residency=0, queue_timeout=0.5),
                       "a", "b") as pool:
        a, b = pool.endpoints[("tiny", "a")], pool.endpoints[("tiny", "b")]
        runner = await pool.acquire(a)
        pool.release(a, runner)
        a.waiters += 1  # a request woke up with a's runner and is about to bind it
        assert not pool.evictable(a)
        with pytest.raises(PoolBusy, match="all 1 runners are busy"):
            await pool.acquire(b)
        a.waiters -= 1
        assert pool.evictable(a)
        other = await pool.acquire(b)
        assert a.state is State.COLD and other.serving
        pool.release(b, other)


async def test_a_runner_found_dead_is_replaced_not_used() -> None:
    async with running(PoolSpec(), "a") as pool:
        a = pool.endpoints[("tiny", "a")]
        first = await pool.acquire(a)
        pool.release(a, first)
        first.kill(reason="killed by the test")
        await first.exited.wait()  # before the reaper ran: acquire notices the exit itself
        second = await pool.acquire(a)
        assert second is not first and second.serving
        assert isinstance(pool.events, Restarts) and pool.events.endpoints == ["tiny/a"]
        pool.release(a, second)


async def test_close_stops_runners_with_sigterm() -> None:
    async with running(PoolSpec(), "a", "b") as pool:
        started = [await pool.acquire(ep) for ep in pool.endpoints.values()]
        for ep, runner in zip(pool.endpoints.values(), started, strict=True):
            pool.release(ep, runner)
    assert [r.returncode for r in started] == [-signal.SIGTERM] * 2


async def test_concurrent_first_requests_share_one_start() -> None:
    async with running(PoolSpec(), "a") as pool:
        a = pool.endpoints[("tiny", "a")]
        got = await asyncio.gather(*(pool.acquire(a) for _ in range(5)))
        assert len({id(r) for r in got}) == 1 and got[0].in_flight == 5
        assert len(pool.runners) == 1
        for runner in got:
            pool.release(a, runner)

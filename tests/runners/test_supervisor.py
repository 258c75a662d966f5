"""The supervisor of helper processes: restarts with backoff, a quiet close, readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import pytest

from runners.errors import HelperUnavailable
from runners.supervisor import Supervisor
from runners.watchdog import Watchdog

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sleeper:
    """A helper process that sleeps; ``fail_starts`` of its first starts fail."""

    name = "sleeper"

    def __init__(self, fail_starts: int = 0) -> None:
        self.fail_starts = fail_starts
        self.starts = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.starts += 1
        if self.starts <= self.fail_starts:
            raise RuntimeError(f"start {self.starts} failed\nsecond line not shown")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(60)")

    async def wait(self) -> int | None:
        assert self.proc is not None
        return await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def test_a_helper_that_exits_is_started_again_after_a_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    supervisor, helper = Supervisor(), Sleeper()
    await supervisor.running(helper, 10)
    assert helper.proc is not None
    first = helper.proc.pid
    os.kill(first, signal.SIGKILL)
    began = time.monotonic()
    while not (supervisor.is_ready("sleeper") and helper.proc.pid != first):
        await asyncio.sleep(0.02)
    assert 0.9 < time.monotonic() - began < 3  # the first backoff is one second
    assert helper.starts == 2
    assert "sleeper process exited with code -9; starting it again in 1s" in caplog.text
    caplog.clear()
    await supervisor.close()
    assert helper.proc.returncode is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a quiet close


async def test_a_helper_that_cannot_start_backs_off_and_callers_are_told() -> None:
    supervisor, helper = Supervisor(), Sleeper(fail_starts=2)
    with pytest.raises(HelperUnavailable, match="start 1 failed") as unavailable:
        await supervisor.running(helper, 0.3)
    assert unavailable.value.retry_after >= 0.5
    assert "second line" not in str(unavailable.value)
    assert supervisor.waiting() == ["sleeper: restarting"]
    await supervisor.running(helper, 10)  # 1 s, then 2 s later it starts
    assert helper.starts == 3 and supervisor.waiting() == []
    await supervisor.close()


async def test_a_restarted_watchdog_holds_every_group_again() -> None:
    """The watchdog kills held groups when the gateway dies: a restarted one must know
    the groups handed to the one before."""
    supervisor = Supervisor()
    watchdog = Watchdog(dict(os.environ))
    await supervisor.running(watchdog, 10)
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", start_new_session=True)
    watchdog.watch(victim.pid)
    assert watchdog._proc is not None
    os.kill(watchdog._proc.pid, signal.SIGKILL)  # the first watchdog dies
    await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        while not supervisor.is_ready("watchdog"):
            await asyncio.sleep(0.05)
    # Closing the new watchdog's input is what the gateway's death looks like to it.
    watchdog._proc.stdin.close()  # type: ignore[union-attr]
    assert await asyncio.wait_for(victim.wait(), 10) == -signal.SIGTERM
    await supervisor.close()

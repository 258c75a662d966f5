"""Supervisor: keeps the pool's helper processes (zygote, resolver, watchdog) running.

Each helper is started, watched until it exits, and started again after a backoff
(1 s, 2 s, 4 s … capped at a minute; the count resets once it has run for a minute), so
a helper that cannot start is never restarted at full speed. Callers that need a helper
wait for it with :meth:`Supervisor.running`, which raises ``HelperUnavailable`` (with
the time of the next attempt) instead of waiting past their deadline.

An exit during :meth:`close` is the expected one and is not reported as a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, TypeVar

from .backoff import backoff
from .errors import HelperUnavailable

log = logging.getLogger("model_gateway.supervisor")

STABLE_AFTER = 60.0  # seconds of running after which earlier failures are forgiven


class Helper(Protocol):
    name: str

    async def start(self) -> None:
        """Start the process and return once it is ready; raise if it cannot start."""

    async def wait(self) -> int | None:
        """Return when the process has exited (its exit code, if known)."""

    async def close(self) -> None:
        """Stop the process on purpose."""


H = TypeVar("H", bound=Helper)


class _Watch:
    """One helper under supervision."""

    def __init__(self, helper: Helper) -> None:
        self.helper = helper
        self.ready = asyncio.Event()
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}
        self._closing = False

    def supervise(self, helper: Helper) -> None:
        """Start ``helper`` now and keep it running until :meth:`close` (idempotent)."""
        if helper.name in self._watches or self._closing:
            return
        watch = self._watches[helper.name] = _Watch(helper)
        watch.task = asyncio.create_task(self._keep_running(watch), name=f"helper-{helper.name}")

    def __contains__(self, name: str) -> bool:
        return name in self._watches

    def is_ready(self, name: str) -> bool:
        watch = self._watches.get(name)
        return watch is not None and watch.ready.is_set()

    def waiting(self) -> list[str]:
        """Supervised helpers that are not ready now, as ``name: starting|restarting``."""
        return [f"{name}: {'restarting' if w.failures else 'starting'}"
                for name, w in self._watches.items() if not w.ready.is_set()]

    async def running(self, helper: H, timeout: float) -> H:
        """``helper`` once it is ready, waiting up to ``timeout``; HelperUnavailable if it
        is not ready by then."""
        self.supervise(helper)
        watch = self._watches[helper.name]
        if watch.helper is not helper:
            raise ValueError(f"another helper is supervised as {helper.name!r}")
        if not watch.ready.is_set():
            try:
                await asyncio.wait_for(watch.ready.wait(), max(timeout, 0.001))
            except TimeoutError:
                wait = max(watch.retry_at - time.monotonic(), 1.0)
                raise HelperUnavailable(
                    f"the {helper.name} process is not running"
                    + (f" ({watch.last_error})" if watch.last_error else ""),
                    retry_after=wait) from None
        return helper

    async def close(self) -> None:
        """Stop every helper, in the reverse order of their start."""
        self._closing = True
        for watch in reversed(list(self._watches.values())):
            if watch.task is not None:
                watch.task.cancel()
                await asyncio.gather(watch.task, return_exceptions=True)
            await watch.helper.close()

    async def _keep_running(self, watch: _Watch) -> None:
        helper = watch.helper
        while not self._closing:
            began = time.monotonic()
            try:
                await helper.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to start is retried
                watch.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                await self._back_off(watch, f"{helper.name} process did not start: "
                                            f"{watch.last_error}")
                continue
            watch.last_error = None
            watch.ready.set()
            code = await helper.wait()
            watch.ready.clear()
            if self._closing:
                return
            if time.monotonic() - began > STABLE_AFTER:
                watch.failures = 0
            watch.last_error = f"exited with code {code}"
            await self._back_off(watch, f"{helper.name} process exited with code {code}")

    async def _back_off(self, watch: _Watch, what: str) -> None:
        watch.failures += 1
        delay = backoff(watch.failures)
        watch.retry_at = time.monotonic() + delay
        log.warning("%s; starting it again in %.0fs", what, delay)
        await asyncio.sleep(delay)

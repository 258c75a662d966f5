"""One runner: an MLflow scoring-server process, its output, and its one HTTP client."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import time

from .client import RunnerClient
from .errors import RunnerStartError, TransportError
from .launch import Fork, LaunchSpec, RunnerProcess, start_process
from .process import kill_group, output_lines
from .spec import EndpointSpec

log = logging.getLogger("model_gateway.runner")

OUTPUT_LINES = 50
TAIL_LINES = 20  # output lines a failure message carries
# A traceback's last line: `ModuleNotFoundError: No module named 'x'`, `mlflow.…Exception: …`
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception)(?::\s.*)?$")


class Runner:
    """Owns one process group and the keep-alive HTTP client to it.

    ``in_flight`` counts requests bound to this runner; ``drained`` is set whenever it is 0,
    so a cutover or an eviction can wait for the last one without polling.
    """

    def __init__(self, spec: EndpointSpec, launch: LaunchSpec, fork: Fork, *,
                 model_uri: str) -> None:
        self.spec = spec  # the endpoint's spec it was started from
        self.launch = launch
        self.model_uri = model_uri  # the pinned URI status shows; launch says what it loads
        self.version = launch.version
        self.port = launch.port
        self.socket = launch.socket
        self.client = RunnerClient("127.0.0.1", launch.port, unix=launch.socket)
        self._fork = fork
        self._proc: RunnerProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.causes: collections.deque[str] = collections.deque(maxlen=4)  # exception lines
        self.started_at: float | None = None
        self.launched_at: float | None = None  # monotonic, when start() was called
        self.ready_at: float | None = None  # monotonic
        self.last_used = time.monotonic()  # reset when ready: used from when it serves
        self.in_flight = 0
        self.drained = asyncio.Event()
        self.drained.set()
        self.exited = asyncio.Event()
        self.stopping = False
        self.kill_reason: str | None = None  # why the pool killed it, when it did
        self.memory = 0  # bytes (PSS) of its process group, measured every few seconds
        self.health_strikes = 0

    # -- identity -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and not self.exited.is_set()

    @property
    def serving(self) -> bool:
        """Alive, ready and not being stopped: a request may be sent to it."""
        return self.ready_at is not None and not self.stopping and not self.exited.is_set()

    def describe(self) -> dict[str, object]:
        return {"pid": self.pid, "port": self.port, "unix_socket": self.socket,
                "version": self.version,
                "started_at": self.started_at, "in_flight": self.in_flight,
                "memory_bytes": self.memory}

    def tail(self, lines: int = OUTPUT_LINES) -> list[str]:
        return list(self.output)[-lines:]

    # -- requests -------------------------------------------------------------------------
    def bind(self) -> None:
        self.in_flight += 1
        self.drained.clear()
        self.last_used = time.monotonic()

    def unbind(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.in_flight <= 0:
            self.in_flight = 0
            self.drained.set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.launched_at = time.monotonic()
        self._proc = await start_process(self.launch, self._fork)
        self.started_at = time.time()
        self._tasks = [
            asyncio.create_task(self._read_output(), name=f"runner-output-{self.pid}"),
            asyncio.create_task(self._watch_exit(), name=f"runner-exit-{self.pid}")]
        log.info("runner started", extra={"endpoint": self.launch.label,
                                          "version": self.version, "pid": self.pid,
                                          "port": self.port})

    async def wait_ready(self, timeout: float) -> None:
        """Ask /ping until it answers 200; fail early when the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited.is_set():
                raise RunnerStartError(self.failure(f"runner exited with code {self.returncode}"))
            try:
                status, _ = await self.client.request("GET", "/ping", timeout=2)
                if status == 200:
                    self.ready_at = self.last_used = time.monotonic()
                    return
            except TransportError:
                pass
            try:
                await asyncio.wait_for(self.exited.wait(), 0.1)
            except TimeoutError:
                pass
        raise RunnerStartError(self.failure(f"runner not ready after {timeout:.0f}s"))

    def failure(self, reason: str) -> str:
        """``reason`` and, when the output names an exception, what caused it, on the first
        line (what callers are told); then the last output lines (for the admin API and
        the log). The first exception of a traceback is its cause; wrappers (`mlflow
        models serve`'s own traceback) come after it."""
        tail = self.tail(TAIL_LINES)
        cause = next(iter(self.causes), None)
        if cause is not None:
            reason = f"{reason} ({cause})"
        lines = "\n".join(tail)
        return f"{reason}\nlast output:\n{lines}" if lines else reason

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        extra = {"endpoint": self.launch.label, "version": self.version, "pid": self._proc.pid}
        async for line in output_lines(self._proc.stdout):
            self.keep_output(line)
            log.info(line, extra=extra)

    def keep_output(self, line: str) -> None:
        """One line of the runner's output: kept for status, and as a cause when it is the
        last line of a traceback (the first few: later ones are wrappers)."""
        self.output.append(line)
        if _EXCEPTION.match(line) and len(self.causes) < (self.causes.maxlen or 0):
            self.causes.append(line)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        await self._proc.wait()
        self.exited.set()
        self.client.close()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, wait up to ``grace``, then SIGKILL and reap."""
        self.stopping = True
        if self._proc is not None and not self.exited.is_set():
            kill_group(self._proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace)
            except TimeoutError:
                kill_group(self._proc.pid, signal.SIGKILL)
                await asyncio.wait_for(self.exited.wait(), 5)
        if self._proc is not None:
            # The leader is gone; make sure nothing else in its group outlives it.
            kill_group(self._proc.pid, signal.SIGKILL)
        self.client.close()
        if self.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the group now. With a reason, the exit counts as a failure, not a stop."""
        if reason is None:
            self.stopping = True
        self.kill_reason = reason
        if self._proc is not None:
            kill_group(self._proc.pid, signal.SIGKILL)

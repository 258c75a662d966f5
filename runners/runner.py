"""One runner: an MLflow scoring-server process on a loopback port."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .errors import RunnerStartError
from .launch import kill_group, output_lines, runner_argv, runner_socket, spawn
from .spec import EndpointSpec

log = logging.getLogger("model_gateway.runner")

# Starts argv with env and returns the process: ``launch.spawn``, or a zygote's fork.
Spawner = Callable[[list[str], dict[str, str]], Awaitable[Any]]

OUTPUT_LINES = 50


class Runner:
    """Owns one process group and one keep-alive HTTP connection pool to it.

    ``in_flight`` counts requests bound to this runner; ``drained`` is set whenever it is 0,
    so a cutover or an eviction can wait for the last one without polling.
    """

    def __init__(self, spec: EndpointSpec, model_uri: str, version: str | None,
                 port: int, env: dict[str, str], spawner: Spawner = spawn, *,
                 python: Path | None = None, model_path: str | None = None) -> None:
        self.spec = spec
        self.model_uri = model_uri  # what status shows; model_path is what it loads
        self.python = python  # a built environment's python, or None for the gateway's
        self.model_path = model_path or model_uri
        self.version = version
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        # The gateway's faster way in, when the runner has one (see launch.runner_socket).
        self.socket = runner_socket(spec, port)
        self._env = env
        self._spawner = spawner
        self._proc: Any = None  # asyncio.subprocess.Process or forked.ForkedProcess
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_used = time.monotonic()
        self.in_flight = 0
        self.drained = asyncio.Event()
        self.drained.set()
        self.exited = asyncio.Event()
        self.stopping = False
        self.kill_reason: str | None = None  # why the pool killed it, when it did
        self.memory = 0  # bytes (PSS) of its process group, measured every few seconds
        self.health_strikes = 0
        self.session: aiohttp.ClientSession | None = None

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

    def describe(self) -> dict[str, object]:
        return {"pid": self.pid, "port": self.port,
                "unix_socket": "@" + self.socket if self.socket else None,
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
        argv = runner_argv(self.spec, self.model_path, self.port, self.python, self.socket)
        self._proc = await self._spawner(argv, self._env)
        self.started_at = time.time()
        self._reader = asyncio.create_task(self._read_output(), name=f"runner-output-{self.pid}")
        self._watcher = asyncio.create_task(self._watch_exit(), name=f"runner-exit-{self.pid}")
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",))
        log.info("runner started", extra={"endpoint": self.spec.label, "version": self.version,
                                          "pid": self.pid, "port": self.port})

    async def wait_ready(self, timeout: float) -> None:
        """Poll /ping until 200; fail early when the process exits."""
        assert self.session is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited.is_set():
                raise RunnerStartError(self.failure(f"runner exited with code {self.returncode}"))
            try:
                async with self.session.get(f"{self.base_url}/ping",
                                            timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        self.ready_at = time.monotonic()
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            try:
                await asyncio.wait_for(self.exited.wait(), 0.1)
            except TimeoutError:
                pass
        raise RunnerStartError(self.failure(f"runner not ready after {timeout:.0f}s"))

    def failure(self, reason: str) -> str:
        """``reason`` with the runner's last output lines, for status and error answers."""
        lines = "\n".join(self.tail(20))
        return f"{reason}; last output:\n{lines}" if lines else reason

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        extra = {"endpoint": self.spec.label, "version": self.version, "pid": self._proc.pid}
        async for line in output_lines(self._proc.stdout):
            self.output.append(line)
            log.info(line, extra=extra)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        await self._proc.wait()
        self.exited.set()

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
        await self._close_session()

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the group now. With a reason, the exit counts as a failure, not a stop."""
        if reason is None:
            self.stopping = True
        self.kill_reason = reason
        if self._proc is not None:
            kill_group(self._proc.pid, signal.SIGKILL)

    async def _close_session(self) -> None:
        if self.session is not None and not self.session.closed:
            await self.session.close()

"""RegistryClient: asks the resolver process which version a model URI points at now."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

from .errors import ResolveError
from .launch import kill_group, spawn
from .target import ModelTarget

log = logging.getLogger("model_gateway.registry")


@dataclass(frozen=True)
class Resolved:
    version: str | None  # the registry version, None for a URI outside the registry
    uri: str  # pinned: models:/NAME/VERSION for registry URIs
    example: str | None = None  # serving input example, when asked for and present


class RegistryClient:
    """Owns the resolver process; restarts it if it dies or stops answering."""

    def __init__(self, env: dict[str, str], *, call_timeout: float = 30.0) -> None:
        self._env = env
        self._timeout = call_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    async def resolve(self, uri: str, *, example: bool = False) -> Resolved:
        target = ModelTarget.parse(uri)
        if not target.in_registry and not example:
            return Resolved(version=None, uri=uri)
        answer = await self._call({"op": "resolve", "uri": uri, "example": example})
        if not answer.get("ok"):
            raise ResolveError(answer.get("error") or "resolver failed")
        return Resolved(version=answer.get("version"), uri=answer["uri"],
                        example=answer.get("example"))

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_started()
        assert self._proc is not None and self._proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._proc.stdin.write((json.dumps({"id": rid, **request}) + "\n").encode())
            await self._proc.stdin.drain()
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError as exc:
            raise ResolveError(f"registry did not answer within {self._timeout:.0f}s") from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ResolveError("resolver process exited") from exc
        finally:
            self._pending.pop(rid, None)

    async def _ensure_started(self) -> None:
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                self._ready = asyncio.get_running_loop().create_future()
                self._proc = await spawn([sys.executable, "-m", "runners.resolver"], self._env,
                                         stdin=asyncio.subprocess.PIPE)
                self._reader = asyncio.create_task(self._read(self._proc, self._ready))
            ready = self._ready
        assert ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(ready), 60)
        except TimeoutError as exc:
            raise ResolveError("resolver process did not start within 60s") from exc

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert proc.stdout is not None
        tail: list[str] = []
        async for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                tail = ([*tail, raw.decode(errors="replace").rstrip()])[-10:]
                continue
            if msg.get("ready"):
                if not ready.done():
                    ready.set_result(None)
                continue
            fut = self._pending.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        await proc.wait()
        error = ResolveError(f"resolver process exited ({proc.returncode}): {' | '.join(tail)}")
        if not ready.done():
            ready.set_exception(error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        log.warning("resolver process exited with code %s", proc.returncode)

    async def start(self) -> None:
        """Start the resolver ahead of the first request (it takes ~2 s to import MLflow)."""
        try:
            await self._ensure_started()
        except ResolveError as exc:
            log.warning("resolver not started: %s", exc)

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), 3)
            except TimeoutError:
                kill_group(self._proc.pid, signal.SIGKILL)
                await self._proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

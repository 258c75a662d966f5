"""RegistryClient: asks the resolver process which version a model URI points at now.

The resolver (``runners.resolver``) is a helper process under the supervisor: it holds
MLflow's client (about 170 MB, and blocking calls) away from the gateway process.
"""

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
from .process import kill_group, spawn
from .target import ModelTarget

log = logging.getLogger("model_gateway.registry")

START_TIMEOUT = 60.0  # importing MLflow takes a few seconds; a cold page cache, more


@dataclass(frozen=True)
class Resolved:
    version: str | None  # the registry version, None for a URI outside the registry
    uri: str  # pinned: models:/NAME/VERSION for registry URIs
    example: str | None = None  # serving input example, when asked for and present


def needs_registry(uri: str) -> bool:
    """Whether resolving ``uri`` asks the registry (a ``models:/`` URI)."""
    return ModelTarget.parse(uri).in_registry


class RegistryClient:
    """The gateway's end of the resolver process (a supervised helper)."""

    name = "resolver"

    def __init__(self, env: dict[str, str], *, call_timeout: float = 30.0) -> None:
        self._env = env
        self._timeout = call_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

    async def resolve(self, uri: str, *, example: bool = False) -> Resolved:
        """The version ``uri`` names now. The resolver must be running (the pool waits for
        it through the supervisor); a URI outside the registry is answered here."""
        if not needs_registry(uri) and not example:
            return Resolved(version=None, uri=uri)
        answer = await self._call({"op": "resolve", "uri": uri, "example": example})
        if not answer.get("ok"):
            raise ResolveError(answer.get("error") or "resolver failed")
        return Resolved(version=answer.get("version"), uri=answer["uri"],
                        example=answer.get("example"))

    async def metadata(self, uri: str) -> dict[str, Any]:
        """A pinned version's MLmodel signature and input example (``runners.signature``)."""
        answer = await self._call({"op": "metadata", "uri": uri})
        if not answer.get("ok"):
            raise ResolveError(answer.get("error") or "resolver failed")
        return answer

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            raise ResolveError("the resolver process is not running")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            proc.stdin.write((json.dumps({"id": rid, **request}) + "\n").encode())
            await proc.stdin.drain()
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError as exc:
            raise ResolveError(f"registry did not answer within {self._timeout:.0f}s") from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ResolveError("resolver process exited") from exc
        finally:
            self._pending.pop(rid, None)

    # -- the helper process ---------------------------------------------------------------
    async def start(self) -> None:
        ready = asyncio.get_running_loop().create_future()
        self._proc = await spawn([sys.executable, "-m", "runners.resolver"], self._env,
                                 stdin=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(self._proc, ready), name="resolver-output")
        try:
            await asyncio.wait_for(ready, START_TIMEOUT)
        except BaseException:
            kill_group(self._proc.pid, signal.SIGKILL)
            raise

    async def wait(self) -> int | None:
        assert self._proc is not None and self._reader is not None
        await asyncio.gather(self._reader, return_exceptions=True)
        return await self._proc.wait()

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert proc.stdout is not None
        tail: list[str] = []
        async for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                tail = [*tail, raw.decode(errors="replace").rstrip()][-10:]
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

    async def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 3)
            except TimeoutError:
                kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

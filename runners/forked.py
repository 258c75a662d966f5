"""The gateway's end of the zygote (see ``runners.zygote``): the ``fork`` launcher.

:class:`Zygote` starts the zygote process and asks it to fork runners; each fork comes
back as a :class:`ForkedProcess`, which offers the part of ``asyncio.subprocess.Process``
that :class:`~runners.runner.Runner` uses (``pid``, ``returncode``, ``wait()``,
``stdout``). The gateway cannot ``waitpid`` a forked runner: the zygote reaps it and
reports its exit over the control socket. A Zygote is a helper process of the
supervisor (``runners.supervisor``): ``start``, ``wait``, ``close``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from .launch import PROJECT_ROOT, LaunchSpec
from .process import kill_group, output_lines, spawn
from .zygote import MAX_MESSAGE, MODELS_ENV, OUTPUT_LINES, ZYGOTE_ARGV, ZygoteError

log = logging.getLogger("model_gateway.zygote")


class ForkedProcess:
    """A forked runner, with the part of ``asyncio.subprocess.Process`` that Runner uses."""

    def __init__(self) -> None:
        self.pid = 0
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = None
        self._exited = asyncio.Event()
        self._transport: asyncio.BaseTransport | None = None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def _set_exit(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set()

    async def _attach(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        self.stdout = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(self.stdout, loop=loop)
        self._transport, _ = await loop.connect_read_pipe(
            lambda: protocol, open(read_fd, "rb", buffering=0))


class Zygote:
    """The gateway's end of one zygote process."""

    name = "zygote"

    def __init__(self, env: dict[str, str], *, start_timeout: float = 120.0,
                 reply_timeout: float = 10.0) -> None:
        self.env = dict(env)
        # The zygote imports runners.zygote: the project must be importable from anywhere.
        path = self.env.get("PYTHONPATH", "")
        if PROJECT_ROOT not in path.split(os.pathsep):
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, path) if p)
        self.start_timeout = start_timeout
        self.reply_timeout = reply_timeout
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.ready_seconds: float | None = None  # the zygote's own import time
        self.models: list[str] = []  # model URIs whose flavours the zygote imports
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], ForkedProcess]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._next_id = 0
        self._lost_reason: str | None = None
        self._gone = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._lost_reason is None

    def failure(self, reason: str) -> str:
        lines = "\n".join(self.output)
        return f"{reason}; zygote output:\n{lines}" if lines else reason

    async def start(self) -> None:
        """Start the zygote and wait until it has imported everything (again, after the
        supervisor saw the last one go)."""
        loop = asyncio.get_running_loop()
        self._pending, self._children, self._tasks = {}, {}, []
        self._lost_reason, self._gone = None, asyncio.Event()
        self.output.clear()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = {**self.env, MODELS_ENV: json.dumps(self.models)}
            self._proc = await spawn(ZYGOTE_ARGV, env, stdin=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._tasks.append(asyncio.create_task(self._read_output(), name="zygote-output"))
        try:
            data = await asyncio.wait_for(loop.sock_recv(ours, MAX_MESSAGE), self.start_timeout)
            ready = json.loads(data) if data else {}
            if ready.get("event") != "ready":
                raise ZygoteError(f"zygote exited during start with code "
                                  f"{await self._exit_code()}")
        except TimeoutError:
            await self._abort(f"zygote not ready after {self.start_timeout:.0f}s")
        except (OSError, ValueError, ZygoteError) as exc:
            await self._abort(str(exc))
        except BaseException:
            await self._abort("zygote start cancelled")
            raise
        self.ready_seconds = ready.get("seconds")
        self._tasks.append(asyncio.create_task(self._read_events(), name="zygote-events"))
        log.info("zygote %s ready in %.1fs (%s modules imported; for the models' flavours: "
                 "%s)", self.pid, self.ready_seconds or 0, ready.get("modules"),
                 ", ".join(ready.get("flavour_modules") or []) or "nothing more")

    async def wait(self) -> int | None:
        """Until the zygote is gone; its exit code when it exited."""
        await self._gone.wait()
        return self._proc.returncode if self._proc else None

    async def fork(self, spec: LaunchSpec) -> ForkedProcess:
        """Fork a runner serving ``spec`` (``runners.serve.run`` with its options)."""
        if not self.is_alive or self._sock is None:
            raise ZygoteError(self.failure(self._lost_reason or "zygote not started"))
        self._next_id += 1
        request_id = self._next_id
        proc = ForkedProcess()
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (reply, proc)
        read_fd, write_fd = os.pipe()
        try:
            try:
                await self._send({"op": "spawn", "id": request_id,
                                  "options": asdict(spec.serve_options()),
                                  "env": dict(spec.env)}, write_fd)
            finally:
                os.close(write_fd)  # from now on only the child holds the write end
            answer = await asyncio.wait_for(reply, self.reply_timeout)
            if "error" in answer:
                raise ZygoteError(answer["error"])
            await proc._attach(read_fd)
        except BaseException as exc:
            self._pending.pop(request_id, None)
            if proc.pid:  # forked, but the caller will never see it: do not leave it running
                kill_group(proc.pid, signal.SIGKILL)
            if proc.stdout is None:
                os.close(read_fd)
            if isinstance(exc, TimeoutError):
                raise ZygoteError(f"zygote did not answer within {self.reply_timeout:.0f}s"
                                  ) from exc
            raise
        return proc

    async def close(self, grace: float = 5.0) -> None:
        """Ask the zygote to stop its children and exit; kill it if it does not."""
        if self._sock is None or self._proc is None:
            return
        if self._lost_reason is None:
            self._lost_reason = "zygote closed"  # no new spawns; exit reports still arrive
            try:
                self._sock.shutdown(socket.SHUT_WR)  # the zygote reads EOF
            except OSError:
                pass
        try:
            await asyncio.wait_for(self._proc.wait(), grace + 3)  # its children get 2 s
        except TimeoutError:
            kill_group(self._proc.pid, signal.SIGKILL)
        await asyncio.wait(self._tasks, timeout=grace + 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._lost("zygote closed")

    # -- internals ----------------------------------------------------------------------
    async def _send(self, message: dict[str, Any], fd: int) -> None:
        assert self._sock is not None
        data = json.dumps(message).encode()
        deadline = time.monotonic() + self.reply_timeout
        while True:
            try:
                socket.send_fds(self._sock, [data], [fd])
                return
            except BlockingIOError:  # the zygote is not reading: busy or hung
                if time.monotonic() > deadline:
                    raise ZygoteError("zygote is not reading its requests") from None
                await asyncio.sleep(0.01)
            except OSError as exc:
                raise ZygoteError(self.failure(f"zygote is gone ({exc})")) from exc

    async def _read_events(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        reason = "zygote exited"
        try:
            while data := await loop.sock_recv(self._sock, MAX_MESSAGE):
                self._dispatch(json.loads(data))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = f"zygote protocol error: {exc!r}"
        finally:
            await self._lost(reason)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("event") == "exit":
            child = self._children.pop(message["pid"], None)
            if child is not None:
                child._set_exit(int(message["returncode"]))
            return
        reply, proc = self._pending.pop(message["id"], (None, None))
        pid = message.get("pid")
        if reply is None or proc is None or reply.done():
            if pid:  # its caller gave up waiting
                kill_group(pid, signal.SIGKILL)
            return
        if pid:
            # Registered before the caller resumes: its exit report may be the next message.
            proc.pid = int(pid)
            self._children[proc.pid] = proc
        reply.set_result(message)

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in output_lines(self._proc.stdout):
            self.output.append(line)
            log.info(line, extra={"pid": self._proc.pid})

    async def _lost(self, reason: str) -> None:
        """The zygote is gone: fail what waits on it, make sure its children died too."""
        if self._lost_reason is None:
            self._lost_reason = reason
        for reply, _ in self._pending.values():
            if not reply.done():
                reply.set_exception(ZygoteError(self.failure(reason)))
        self._pending.clear()
        orphans, self._children = list(self._children.values()), {}
        for child in orphans:  # PR_SET_PDEATHSIG got them already; their groups may not be
            kill_group(child.pid, signal.SIGKILL)
        if self._proc is not None and self._proc.returncode is None:
            kill_group(self._proc.pid, signal.SIGKILL)
        await _until_gone([c.pid for c in orphans], timeout=2.0)
        for child in orphans:
            child._set_exit(-signal.SIGKILL)
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            await self._exit_code()
        self._gone.set()

    async def _abort(self, reason: str) -> NoReturn:
        if self._proc is not None and self._proc.returncode is None:
            kill_group(self._proc.pid, signal.SIGKILL)
        await self._exit_code()
        await asyncio.wait(self._tasks, timeout=2)
        await self._lost(reason)
        raise ZygoteError(self.failure(reason))

    async def _exit_code(self) -> int | None:
        assert self._proc is not None
        try:
            return await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            return None


async def _until_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` is running (gone, or a zombie for init to reap)."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        if pids:
            await asyncio.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

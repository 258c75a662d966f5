"""RunnerClient: the one HTTP client of one runner, for proxying, health checks and warm-up.

It keeps idle keep-alive connections (``runners.connection``) to the runner's unix
socket when it has one, else to its TCP port. Three ways to use it:

- :meth:`RunnerClient.request`: a whole request and a whole answer (``/ping``, the
  warm-up prediction); the connection is released before it returns.
- :meth:`RunnerClient.exchange`: send a request (its body may stream) and get a
  :class:`Response` as soon as the answer's head is in; closing the response (or
  leaving its ``async with``) hands the connection back, or drops it when the exchange
  did not end cleanly.
- :meth:`take` / :meth:`send` / :meth:`finish`: the same exchange driven from callbacks,
  with no task (the gateway's direct path).

Every failure is one of the transport errors of ``runners.errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

from .connection import RunnerConnection
from .errors import ConnectError, ReadTimeout, ServerDisconnected, TransportError

IDLE_TIMEOUT = 4.0  # below uvicorn's 5 s keep-alive: never reuse a connection it may close
MAX_IDLE = 256  # idle connections kept per runner


class OutgoingRequest(Protocol):
    """A request for a runner: ``head`` is its request line and headers, each line ending
    in CRLF, without Host or framing headers (the client adds those)."""

    method: str
    head: bytes
    content_length: int | None


class _Request:
    __slots__ = ("content_length", "head", "method")

    def __init__(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.head = b"%s %s HTTP/1.1\r\n%s" % (
            method.encode(), path.encode(), b"".join(b"%s: %s\r\n" % h for h in headers))
        self.content_length: int | None = None


class Response:
    """A runner's answer. ``complete``: the whole body is in (:meth:`read_buffered`);
    else it streams (:meth:`iter_body`). :meth:`close` releases the connection."""

    __slots__ = ("_client", "_closed", "conn")

    def __init__(self, client: RunnerClient, conn: RunnerConnection) -> None:
        self._client = client
        self.conn = conn
        self._closed = False

    @property
    def status(self) -> int:
        return self.conn.status

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's headers, lower-case names, without hop-by-hop, Date and Server."""
        return self.conn.headers

    @property
    def complete(self) -> bool:
        return self.conn.complete

    @property
    def has_length(self) -> bool:
        return self.conn.has_length

    def read_buffered(self) -> bytes:
        """The body received so far (all of it when ``complete``)."""
        return self.conn.take_body()

    def iter_body(self, timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives; ``timeout`` applies to each read."""
        return self.conn.iter_body(timeout)

    async def read(self, timeout: float) -> bytes:
        return b"".join([chunk async for chunk in self.iter_body(timeout)])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.finish(self.conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class RunnerClient:
    """Idle keep-alive connections to one runner, most recently used first."""

    def __init__(self, host: str, port: int | None, *, unix: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix = unix
        self.host_header = b"host: %s:%d\r\n" % (host.encode(), port) if port \
            else b"host: %s\r\n" % host.encode()
        self._idle: list[RunnerConnection] = []

    async def request(self, method: str, path: str, *, body: bytes = b"",
                      headers: list[tuple[bytes, bytes]] | None = None,
                      timeout: float) -> tuple[int, bytes]:
        """One whole exchange: (status, body). Raises a TransportError."""
        deadline = time.monotonic() + timeout
        async with await self.exchange(_Request(method, path, headers or []), body,
                                       deadline) as response:
            data = response.read_buffered() if response.complete else \
                await response.read(max(deadline - time.monotonic(), 0.001))
            return response.status, data

    async def exchange(self, request: OutgoingRequest, body: bytes | AsyncIterator[bytes],
                       deadline: float, *, sent: RunnerConnection | None = None) -> Response:
        """Send the request; the answer once its head is in (its whole body too when
        small). ``sent``: a reused connection the request was already written to. A reused
        connection that the runner closed before answering is replaced once, when the body
        can be sent again."""
        may_retry = isinstance(body, bytes)
        conn, reused, written = sent, True, sent is not None
        while True:
            if conn is None:
                conn = self.take()
                reused, written = conn is not None, False
                if conn is None:
                    conn = await self._connect(deadline - time.monotonic())
            try:
                if not written:
                    await self._write(conn, request, body, deadline)
                await conn.read_head(deadline)
                return Response(self, conn)
            except ServerDisconnected:
                conn.abort()
                if not (may_retry and reused and not conn.received):
                    raise
                may_retry, conn = False, None
            except BaseException:
                conn.abort()
                raise

    def send(self, conn: RunnerConnection, request: OutgoingRequest, body: bytes) -> None:
        """Start an exchange on ``conn`` by writing the whole request in one piece."""
        conn.expect(head_only=request.method == "HEAD")
        framing = (b"content-length: %d\r\n\r\n" % len(body)
                   if body or request.method in ("POST", "PUT") else b"\r\n")
        conn.send(request.head + self.host_header + framing + body)

    async def _write(self, conn: RunnerConnection, request: OutgoingRequest,
                     body: bytes | AsyncIterator[bytes], deadline: float) -> None:
        if isinstance(body, bytes):
            self.send(conn, request, body)
            return
        conn.expect(head_only=request.method == "HEAD")
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await conn.send_stream(request.head + self.host_header, body,
                                       request.content_length)
        except TimeoutError as exc:
            raise ReadTimeout("the request body did not reach the runner in time") from exc

    def finish(self, conn: RunnerConnection) -> None:
        """Keep ``conn`` for the next request if its exchange ended cleanly, else close it."""
        conn.listener = None
        if conn.reusable and len(self._idle) < MAX_IDLE:
            conn.idle()
            self._idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: RunnerConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        """Close every idle connection (the runner is going away)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    def take(self) -> RunnerConnection | None:
        """An idle connection to reuse, or None."""
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.idle_since > IDLE_TIMEOUT:
                self.close()  # the rest are older still
                conn.abort()
                return None
            if conn.reusable:
                return conn
            conn.abort()
        return None

    async def _connect(self, timeout: float) -> RunnerConnection:
        where = self.unix or f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                return await (self._connect_unix(self.unix) if self.unix else self._connect_tcp())
        except TimeoutError as exc:
            raise ConnectError(f"cannot connect to {where}: timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from exc

    async def _connect_tcp(self) -> RunnerConnection:
        if self.port is None:
            raise ConnectionRefusedError(111, "the runner has no TCP port")
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: RunnerConnection(self), self.host, self.port)
        return conn

    async def _connect_unix(self, path: str) -> RunnerConnection:
        _, conn = await asyncio.get_running_loop().create_unix_connection(
            lambda: RunnerConnection(self), path)
        return conn


__all__ = ["OutgoingRequest", "Response", "RunnerClient", "TransportError"]

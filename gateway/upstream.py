"""Keep-alive HTTP/1.1 connections from the gateway to one runner.

Requests are written as raw bytes and answers parsed by httptools: a general HTTP client
costs several times more CPU per request, and on a small machine every microsecond the
gateway spends is taken from the model (see ``bench/proxy.py``).

Failures are raised as aiohttp's exception types so that ``errors.map_error`` maps them:

    connect refused / reset          aiohttp.ClientOSError            → 502
    closed before a complete answer  aiohttp.ServerDisconnectedError  → 502
    malformed answer                 aiohttp.ClientPayloadError       → 502
    no answer within request_timeout TimeoutError                     → 504
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiohttp
import httptools

from .types import Scope

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host"})
# The gateway sets these itself on the way to the runner.
REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect", b"x-forwarded-for",
                             b"x-request-id", b"authorization"}
# The gateway's own server adds these; the runner's copies would be duplicates.
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
IDLE_TIMEOUT = 4.0  # below uvicorn's 5 s keep-alive: never reuse a connection it may close
SMALL_BODY = 256 * 1024  # bodies up to this size are sent in one piece, larger ones stream
MAX_IDLE = 256  # idle connections kept per runner
READ_HIGH_WATER = 1024 * 1024  # stop reading a streamed answer the client is slow to take

_ids = random.Random()  # request ids need to be unique, not secret: no syscall per request


class IncomingRequest:
    """What the runner is sent for one request: its head, without framing headers.

    The one pass over the headers also keeps what the proxy checks before forwarding:
    ``authorization`` (never forwarded), ``content_length`` and ``header_bytes``.
    """

    __slots__ = ("authorization", "content_length", "head", "header_bytes", "method",
                 "request_id")

    def __init__(self, scope: Scope, action: str) -> None:
        self.method: str = scope["method"]
        query: bytes = scope.get("query_string") or b""
        parts = [self.method.encode(), b" /", action.encode(), b"?" if query else b"", query,
                 b" HTTP/1.1\r\n"]
        request_id = forwarded = length = authorization = None
        size = 0
        for key, value in scope["headers"]:  # names are lower-case, values validated
            size += len(key) + len(value) + 4
            if key in REQUEST_DROP:
                if key == b"x-request-id":
                    request_id = request_id or value  # the first one
                elif key == b"x-forwarded-for":
                    forwarded = value  # the last one
                elif key == b"content-length":
                    length = value
                elif key == b"authorization":
                    authorization = value
                continue
            parts += (key, b": ", value, b"\r\n")
        client = scope.get("client")
        if client:
            address = client[0].encode()
            forwarded = forwarded + b", " + address if forwarded else address
        if forwarded:
            parts += (b"x-forwarded-for: ", forwarded, b"\r\n")
        self.request_id: bytes = request_id or b"%032x" % _ids.getrandbits(128)
        parts += (b"x-request-id: ", self.request_id, b"\r\n")
        self.head = b"".join(parts)
        # httptools has already refused a Content-Length that is not a number; the check
        # only keeps int() from raising.
        self.content_length: int | None = int(length) if length and length.isdigit() else None
        self.authorization: str | None = authorization.decode("latin-1") if authorization \
            else None
        self.header_bytes = size


# -- the upstream side: keep-alive connections to one runner -------------------------------
class UpstreamPool:
    """Idle keep-alive connections to one runner, most recently used first.

    Connections go to ``unix`` (an abstract unix socket name) when given, else to
    ``host:port``. ``answer_headers`` are added to every answer from this runner (its
    model version/URI).
    """

    def __init__(self, host: str, port: int,
                 answer_headers: list[tuple[bytes, bytes]] | None = None, *,
                 unix: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix = unix
        self.answer_headers = answer_headers or []
        self.host_header = b"host: %s:%d\r\n" % (host.encode(), port)
        self._idle: list[UpstreamConnection] = []

    async def exchange(self, request: IncomingRequest, body: bytes | AsyncIterator[bytes],
                       deadline: float, *, sent: UpstreamConnection | None = None
                       ) -> UpstreamConnection:
        """Send the request; return the connection once the answer's head is in (its whole
        body too when small). ``sent`` is a reused connection the request was already
        written to (see ``direct.py``). A reused connection that the runner closed before
        answering is replaced once, when the body can be sent again."""
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
                return conn
            except aiohttp.ServerDisconnectedError:
                conn.abort()
                if not (may_retry and reused and not conn.received):
                    raise
                may_retry, conn = False, None
            except BaseException:
                conn.abort()
                raise

    def send(self, conn: UpstreamConnection, request: IncomingRequest, body: bytes) -> None:
        """Start an exchange on ``conn`` by writing the whole request in one piece."""
        conn.expect(head_only=request.method == "HEAD")
        framing = (b"content-length: %d\r\n\r\n" % len(body)
                   if body or request.method in ("POST", "PUT") else b"\r\n")
        conn.send(request.head + self.host_header + framing + body)

    async def _write(self, conn: UpstreamConnection, request: IncomingRequest,
                     body: bytes | AsyncIterator[bytes], deadline: float) -> None:
        if isinstance(body, bytes):
            self.send(conn, request, body)
            return
        conn.expect(head_only=request.method == "HEAD")
        async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
            await conn.send_stream(request.head + self.host_header, body,
                                   request.content_length)

    def finish(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        """Keep ``conn`` for the next request if its exchange ended cleanly, else close it."""
        if reuse and conn.reusable and len(self._idle) < MAX_IDLE:
            conn.idle()
            self._idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    def take(self) -> UpstreamConnection | None:
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

    async def _connect(self, timeout: float) -> UpstreamConnection:
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                return await (self._connect_unix(self.unix) if self.unix else self._connect_tcp())
        except OSError as exc:
            where = f"@{self.unix}" if self.unix else f"{self.host}:{self.port}"
            raise aiohttp.ClientOSError(exc.errno, f"cannot connect to {where}: "
                                                   f"{exc.strerror}") from exc

    async def _connect_tcp(self) -> UpstreamConnection:
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: UpstreamConnection(self), self.host, self.port)
        return conn

    async def _connect_unix(self, name: str) -> UpstreamConnection:
        # uvloop refuses abstract names by path (EINVAL): connect the socket first.
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, "\0" + name)
            _, conn = await loop.create_unix_connection(lambda: UpstreamConnection(self),
                                                        sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a runner, carrying one exchange at a time.

    httptools parses the answer as it arrives; the proxy waits on one future at a time:
    for the head (and the whole body when it is small), then for each streamed chunk.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        # Called instead of waking a waiter, by a request served without a task (direct.py)
        self.listener: Callable[[], None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.closed = False
        self.idle_since = 0.0
        self._reset(head_only=False)
        self._active = False

    def _reset(self, *, head_only: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.received = False
        self._active = True
        self.sent = False
        self.error: BaseException | None = None
        self._head_only = head_only
        self._head_done = False
        self._length: int | None = None
        self._chunked = False
        self._interim = False
        self._keep_alive = False  # read when the answer completes: the parser resets after
        self._streaming = False
        self._chunks: list[bytes] = []
        self._buffered = 0

    @property
    def has_length(self) -> bool:
        """Whether the answer came with a Content-Length."""
        return self._length is not None

    @property
    def reusable(self) -> bool:
        return (not self.closed and self.complete and self.sent and self._keep_alive
                and not self._head_only)

    # -- used by the pool -----------------------------------------------------------------
    def expect(self, *, head_only: bool) -> None:
        """Start a new exchange (``head_only``: the answer to a HEAD request has no body)."""
        self._reset(head_only=head_only)
        if self.closed:
            self.error = aiohttp.ServerDisconnectedError()

    def idle(self) -> None:
        """The exchange is over and the connection goes back to the pool."""
        self._active = False
        self.idle_since = time.monotonic()

    def send(self, request: bytes) -> None:
        """Write a whole request."""
        self._write(request)
        self.sent = True

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(data)

    async def send_stream(self, head: bytes, body: AsyncIterator[bytes],
                          length: int | None) -> None:
        """Stream a request body: as is under the client's Content-Length, else chunked."""
        chunked = length is None
        self._write(head + (b"transfer-encoding: chunked\r\n\r\n" if chunked else
                            b"content-length: %d\r\n\r\n" % length))
        async for chunk in body:
            if self.closed or self.complete:  # the runner answered (or left) early
                return  # the request is cut short: the connection is not reused
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._write_paused:
                self._drain = self._loop.create_future()
                await self._drain
        if chunked:
            self._write(b"0\r\n\r\n")
        self.sent = True

    async def read_head(self, deadline: float) -> None:
        """Wait until the head is in, and the whole body when it is small."""
        while not (self.complete or self._streaming):
            if self.error is not None:
                raise self.error
            await self._wait(deadline - time.monotonic())

    async def iter_body(self, timeout: float) -> AsyncIterator[bytes]:
        """The rest of a streamed body, as it arrives; ``timeout`` applies to each read."""
        while True:
            if self._chunks:
                yield self.take_body()
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self._wait(timeout)

    def take_body(self) -> bytes:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
        self._pool.discard(self)

    async def _wait(self, timeout: float) -> None:
        if timeout <= 0:
            raise TimeoutError()
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        if self.listener is not None:
            self.listener()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._active:  # nothing was asked: the connection is out of step
            self.abort()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed answer from the runner: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        if self._head_done and not self.complete and self._length is None \
                and not self._chunked:
            self.complete = True  # an answer without framing ends with the connection
            self._wake()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.discard(self)
        if not self.complete:
            self._fail(aiohttp.ServerDisconnectedError(
                f"the runner closed the connection ({exc or 'EOF'})"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._length = int(value)
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()
        if name not in RESPONSE_DROP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): wait for the final one
            self._interim = True
            self.headers, self._length, self._chunked = [], None, False
            return
        self.status = status
        self._head_done = True
        if self._head_only:
            self.complete = True
            self._wake()
        elif self._length is None or self._length > SMALL_BODY:
            self._streaming = True
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._streaming:
            if self._buffered > READ_HIGH_WATER and not self._read_paused \
                    and self._transport is not None:
                self._read_paused = True
                self._transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

"""RunnerConnection: one keep-alive HTTP/1.1 connection to a runner, one exchange at a time.

Requests go out as raw bytes and answers are parsed by httptools as they arrive: a
general HTTP client costs several times more CPU per request, and on a small machine
every microsecond the gateway spends is taken from the model (see ``bench/proxy.py``).

An exchange is driven either by a task that awaits :meth:`read_head` and
:meth:`iter_body`, or, with no task at all, by a ``listener`` callback that the
connection calls when the answer is complete, starts streaming, or fails (the gateway's
direct path). Failures are the transport errors of ``runners.errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

import httptools

from .errors import ReadTimeout, RemoteProtocolError, ServerDisconnected

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host"})
# The gateway's own server adds these; the runner's copies would be duplicates.
ANSWER_DROP = HOP_BY_HOP | {b"date", b"server"}
SMALL_ANSWER = 256 * 1024  # answers up to this size are read whole, larger ones stream
READ_HIGH_WATER = 1024 * 1024  # stop reading a streamed answer the caller is slow to take


class Owner(Protocol):
    """What a connection tells the client that keeps it (``runners.client``)."""

    def discard(self, conn: RunnerConnection) -> None:
        """``conn`` closed: it is no longer idle or usable."""


class RunnerConnection(asyncio.Protocol):
    """httptools parses the answer; a task waits on one future at a time (the head, with
    the whole body when it is small, then each streamed chunk), or ``listener`` is called.
    """

    def __init__(self, client: Owner) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
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
        self.error: Exception | None = None
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
                and not self._head_only and self.error is None)

    # -- used by the client ---------------------------------------------------------------
    def expect(self, *, head_only: bool) -> None:
        """Start a new exchange (``head_only``: the answer to a HEAD request has no body)."""
        self._reset(head_only=head_only)
        if self.closed:
            self.error = ServerDisconnected("the runner closed the connection")

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
        """Stream a request body: as is under the caller's Content-Length, else chunked."""
        chunked = length is None
        self._write(head + (b"transfer-encoding: chunked\r\n\r\n" if length is None else
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

    def peek_body(self) -> bytes:
        """The body received so far, left in place for ``take_body``."""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

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
        self._client.discard(self)

    async def _wait(self, timeout: float) -> None:
        if timeout <= 0:
            raise ReadTimeout("the runner did not answer in time")
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @staticmethod
    def _time_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(ReadTimeout("the runner did not answer in time"))

    def _wake(self) -> None:
        if self.listener is not None:
            self.listener()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
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
            self._fail(RemoteProtocolError(f"malformed answer from the runner: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        if self._head_done and not self.complete and self._length is None \
                and not self._chunked:
            self.complete = True  # an answer without framing ends with the connection
            self._wake()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client.discard(self)
        if not self.complete:
            self._fail(ServerDisconnected(f"the runner closed the connection ({exc or 'EOF'})"))

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
        if name not in ANSWER_DROP:
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
        elif self._length is None or self._length > SMALL_ANSWER:
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

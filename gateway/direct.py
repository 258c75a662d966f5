"""DirectExchange: a proxied request served from the server's callbacks, without a task.

Most prediction traffic is small requests to a runner that is already serving, over a
keep-alive connection the gateway already holds. For those, the ASGI cycle around the
proxy (scope, task, events, message dicts, awaits on futures) costs as much CPU as the
proxying itself, and on a small machine that CPU is taken from the model. A
DirectExchange writes the request to an idle runner connection as soon as the caller's
request is complete, and writes the answer to the caller from the callback that
completes it.

Only that plain case is served this way. Whenever anything else is needed, the request
continues on the ordinary path, with nothing sent to the caller yet:

    no serving runner, or a max_concurrency queue → uvicorn's cycle and ModelProxy from
                                                     the start, as if never seen here
    no idle connection to the runner, an error,   → ModelProxy.relay in a task, on the
    the request timeout, or an answer too large      connection the request went out on,
    to hold in memory                                or a new one (it connects, retries,
                                                     maps errors, streams)

While it is in flight an exchange is the protocol's current cycle, so uvicorn's own
handling of pipelined requests, lost connections and graceful shutdown applies to it:
those read and write ``response_complete``, ``disconnected``, ``keep_alive`` and call
``message_event.set()``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from runners import Endpoint, Runner

from .types import Receive, Scope, Send
from .upstream import IncomingRequest, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from .protocol import GatewayHttpProtocol
    from .proxy import ModelProxy


class _NothingWaits:
    """uvicorn wakes its cycle's reader when the connection is lost; nothing reads here."""

    @staticmethod
    def set() -> None:
        return None


class DirectExchange:
    __slots__ = ("body", "chunks", "conn", "deadline", "disconnected", "ep", "keep_alive",
                 "protocol", "proxy", "request", "response_complete", "runner", "scope",
                 "started", "timer", "upstream")
    message_event = _NothingWaits()

    def __init__(self, protocol: GatewayHttpProtocol, proxy: ModelProxy, scope: Scope,
                 ep: Endpoint, request: IncomingRequest, *, keep_alive: bool) -> None:
        self.protocol = protocol
        self.proxy = proxy
        self.scope = scope
        self.ep = ep
        self.request = request
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.started = time.perf_counter()
        self.chunks: list[bytes] = []
        self.body = b""
        self.deadline = 0.0
        self.runner: Runner | None = None
        self.upstream: UpstreamPool | None = None
        self.conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None

    def receive(self, chunk: bytes) -> None:
        # A body is only forwarded under a Content-Length (at most SMALL_BODY, see
        # ModelProxy.admit); any other body on a GET is dropped, as ModelProxy drops it.
        if self.request.content_length is not None:
            self.chunks.append(chunk)

    def dispatch(self) -> None:
        """The caller's request is in: write it to an idle connection to a serving runner,
        or hand it to the ordinary path."""
        self.body = b"".join(self.chunks)
        ep = self.ep
        runner = self.proxy.pool.acquire_now(ep)
        if runner is None:
            self.protocol.run_cycle(self, self.protocol.app)
            return
        upstream = self.proxy.upstream(runner)
        timeout = ep.spec.request_timeout
        self.runner, self.upstream = runner, upstream
        self.deadline = time.monotonic() + timeout
        conn = self.conn = upstream.take()
        if conn is None:  # relay() connects, on the runner already bound
            self.protocol.run_cycle(self, self._relay)
            return
        self.timer = self.protocol.loop.call_later(timeout, self.answered)
        conn.listener = self.answered
        upstream.send(conn, self.request, self.body)

    def answered(self) -> None:
        """The answer is complete, or streaming, or failed, or the timeout is up."""
        conn = self.conn
        assert conn is not None and self.timer is not None
        conn.listener = None
        self.timer.cancel()
        if conn.complete and conn.error is None and conn.status in STATUS_LINE:
            self._respond(conn)
        else:  # relay() reads the error or the timeout from the connection and answers
            self.protocol.run_cycle(self, self._relay)

    def _respond(self, conn: UpstreamConnection) -> None:
        assert self.upstream is not None
        request, status = self.request, conn.status
        body = conn.take_body()
        if not self.disconnected:
            head = [STATUS_LINE[status]]
            for name, value in (*self.protocol.server_state.default_headers, *conn.headers,
                                *self.upstream.answer_headers):
                head += (name, b": ", value, b"\r\n")
            head += (b"x-request-id: ", request.request_id, b"\r\n")
            head_only = request.method == "HEAD"
            if not conn.has_length and not head_only and status not in (204, 304):
                head.append(b"content-length: %d\r\n" % len(body))
            if not self.keep_alive:
                head.append(b"connection: close\r\n")
            head.append(b"\r\n")
            if not head_only:
                head.append(body)
            self.protocol.coalescing.send_now(b"".join(head))
        self.upstream.finish(conn, reuse=True)
        self.response_complete = True
        self._finish(status)
        if not self.keep_alive:
            self.protocol.transport.close()
        self.protocol.on_response_complete()

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The rest of the exchange, as an ASGI app on uvicorn's cycle."""
        assert self.runner is not None
        status = 500
        try:
            status = await self.proxy.relay(self.request, self.body, send, self.ep,
                                            self.runner, self.deadline, sent=self.conn)
        finally:
            self._finish(status)

    def _finish(self, status: int) -> None:
        assert self.runner is not None
        self.proxy.pool.release(self.ep, self.runner)
        self.proxy.record(self.scope, self.ep, self.runner, status, self.started,
                          self.request.request_id)

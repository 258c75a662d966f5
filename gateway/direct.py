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

    no serving runner, or a max_concurrency queue → the ASGI path and ModelProxy from
                                                     the start, as if never seen here
    no idle connection to the runner, an error,   → ModelProxy.relay on the ASGI path, on
    the request timeout, or an answer too large      the connection the request went out
    to hold in memory                                on, or a new one (it connects,
                                                     retries, maps errors, streams)

The exchange knows the server only through :class:`ServerConnection`: it asks it to
write the answer, to fall back to the ASGI path, and to finish (``protocol.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from runners import Endpoint, Runner, RunnerConnection

from .request import IncomingRequest
from .types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from .proxy import ModelProxy


class ServerConnection(Protocol):
    """The server side of one exchange."""

    def write_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *,
                     head_only: bool, has_length: bool) -> bool:
        """Write the answer (the server adds its default headers and the framing); False
        when the status is not one it can write, and nothing was written."""

    def fall_back(self, app: ASGIApp, body: bytes) -> None:
        """Serve the rest of the exchange with ``app`` on the ASGI path; ``body`` is the
        request's whole body."""

    def finish(self) -> None:
        """The answer is written; the connection goes on to the next request (or closes)."""


class DirectExchange:
    __slots__ = ("body", "chunks", "conn", "connection", "deadline", "disconnected", "ep",
                 "loop", "proxy", "request", "runner", "scope", "timer")

    def __init__(self, connection: ServerConnection, proxy: ModelProxy, scope: Scope,
                 ep: Endpoint, request: IncomingRequest,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.connection = connection
        self.loop = loop
        self.proxy = proxy
        self.scope = scope
        self.ep = ep
        self.request = request
        self.disconnected = False  # set by the server when the caller goes away
        self.chunks: list[bytes] = []
        self.body = b""
        self.deadline = 0.0
        self.runner: Runner | None = None
        self.conn: RunnerConnection | None = None
        self.timer: asyncio.TimerHandle | None = None

    def receive(self, chunk: bytes) -> None:
        # A body is only forwarded under a Content-Length (at most SMALL_BODY, see
        # ModelProxy.admit); any other body on a GET is dropped, as ModelProxy drops it.
        if self.request.content_length is not None:
            self.chunks.append(chunk)

    def dispatch(self) -> None:
        """The caller's request is in: queue it with the endpoint's batcher, or write it
        to an idle connection to a serving runner, or hand it to the ordinary path."""
        self.body = b"".join(self.chunks)
        batcher = self.proxy.batcher(self.ep, self.request, self.scope)
        if batcher is not None and batcher.offer(self.scope, self.request.content_type,
                                                 self.body, self):
            return
        self.go()

    def alone(self) -> bool:
        """The batcher lets the request go its own way (``batching.Member``)."""
        self.go()
        return True

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
               runner: Runner) -> None:
        """The request's part of a merged answer (``batching.Member``)."""
        request = self.request
        if not self.disconnected:
            self.connection.write_answer(
                status, [*headers, *self.proxy.identity(runner),
                         (b"x-request-id", request.request_id)], body,
                head_only=False, has_length=False)
        self.proxy.record(self.scope, self.ep, runner, status, request.started,
                          request.request_id)
        self.proxy.answered(self.ep, request, self.body, status, body, runner)
        self.connection.finish()

    def go(self) -> None:
        """Write the request to an idle connection, or hand it to the ordinary path."""
        ep = self.ep
        runner = self.proxy.pool.acquire_now(ep, self.scope["headers"])
        if runner is None:
            self.connection.fall_back(*self.unsent())
            return
        timeout = ep.spec.request_timeout
        self.runner = runner
        self.deadline = time.monotonic() + timeout
        conn = self.conn = runner.client.take()
        if conn is None:
            self.no_connection()
            return
        self.timer = self.loop.call_later(timeout, self.answered)
        conn.listener = self.answered
        runner.client.send(conn, self.request, self.body)

    # -- where the ordinary path takes over (a V2 exchange takes over elsewhere) ----------
    def unsent(self) -> tuple[ASGIApp, bytes]:
        """The app and body that serve the request from the start (nothing was sent)."""
        return self.proxy, self.body

    def no_connection(self) -> None:
        """A runner is bound but has no idle connection: relay() connects on it."""
        self.connection.fall_back(self._relay, self.body)

    def sent(self) -> tuple[ASGIApp, bytes]:
        """The app and body that finish an exchange whose request went out on ``conn``."""
        return self._relay, self.body

    def answered(self) -> None:
        """The answer is complete, or streaming, or failed, or the timeout is up."""
        conn = self.conn
        assert conn is not None and self.timer is not None and self.runner is not None
        conn.listener = None
        self.timer.cancel()
        if conn.complete and conn.error is None and self._respond(conn, self.runner):
            return
        # relay() reads the error or the timeout from the connection and answers
        self.connection.fall_back(*self.sent())

    def _respond(self, conn: RunnerConnection, runner: Runner) -> bool:
        request, status = self.request, conn.status
        if not self.disconnected:
            headers = [*conn.headers, *self.proxy.identity(runner),
                       (b"x-request-id", request.request_id)]
            # Peeked, not taken: an answer the server cannot write goes the ASGI path whole.
            if not self.connection.write_answer(status, headers, conn.peek_body(),
                                                head_only=request.method == "HEAD",
                                                has_length=conn.has_length):
                return False
        self.proxy.answered(self.ep, request, self.body, status, conn.peek_body(), runner)
        runner.client.finish(conn)
        self._finish(status)
        self.connection.finish()
        return True

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The rest of the exchange, as an ASGI app on the ordinary path."""
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
        self.proxy.record(self.scope, self.ep, self.runner, status, self.request.started,
                          self.request.request_id)

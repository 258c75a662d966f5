"""GatewayHttpProtocol: uvicorn's httptools protocol, with one send per answer and
proxied requests served without the ASGI cycle where they can be.

uvicorn writes an answer's head on ``http.response.start`` and its body on
``http.response.body``: two ``send`` system calls and two TCP segments for every small
answer, and the client is woken twice. Here a write is held back until the next one,
which takes it along (the body takes the head), or until the end of the event-loop step:
a small answer leaves in one piece, as soon as its body is written, and nothing waits
for a later step. This is most of what a small prediction's answer costs to send (see
``bench/proxy.py``).

A plain proxied request to a serving runner (most prediction traffic) is a
DirectExchange (``direct.py``): served from this protocol's callbacks, with no task.
Everything else, and any proxied request the moment it needs more, goes through uvicorn's
request cycle to the ASGI app.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .direct import DirectExchange
from .proxy import PROXIED, ModelProxy, parse_route
from .types import ASGIApp


class CoalescingTransport:
    """A transport that sends writes in pairs: a write is held until the next write
    (which sends both at once) or the end of the current event-loop step, whichever comes
    first. ``close`` and ``write_eof`` send what is held first; the rest is the wrapped
    transport's.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)  # a no-op when the next write came first
        else:
            self._held = None
            self._send(held + data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send(held)

    def _send(self, data: bytes) -> None:
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def send_now(self, data: bytes) -> None:
        """Write ``data`` at once, after anything held."""
        held, self._held = self._held, None
        self._send(held + data if held is not None else data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # close() sends what is buffered, so buffered here too
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescingTransport, serving plain proxied
    requests as DirectExchanges (``direct.py``) and everything else through ASGI."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.config.app
        self.proxy: ModelProxy | None = app if isinstance(app, ModelProxy) else None
        self._receiving: DirectExchange | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.coalescing = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(self.coalescing)  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        exchange = self._direct_exchange()
        if exchange is None:
            super().on_headers_complete()
        else:
            self.cycle = self._receiving = exchange  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self._receiving is not None:
            self._receiving.receive(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        exchange, self._receiving = self._receiving, None
        if exchange is not None:
            exchange.dispatch()
        else:
            super().on_message_complete()

    def _direct_exchange(self) -> DirectExchange | None:
        """A DirectExchange for this request, or None when it takes the ASGI path: not a
        proxied route, refused, a body to stream, 100-continue, an upgrade, a concurrency
        limit, or pipelined behind a request still being answered."""
        proxy, cycle = self.proxy, self.cycle
        if proxy is None or self.expect_100_continue or self.limit_concurrency is not None \
                or (cycle is not None and not cycle.response_complete) \
                or self.parser.should_upgrade():
            return None
        parsed = httptools.parse_url(self.url)
        raw_path = self.root_path.encode("ascii") + parsed.path
        route = parse_route(raw_path)
        if route is None or route[2] not in PROXIED:
            return None
        # The scope the ASGI path would build: the access line and, if the request moves
        # to the ASGI path later, ModelProxy read it.
        scope = self.scope
        path = parsed.path.decode("ascii")
        scope["method"] = self.parser.get_method().decode("ascii")
        scope["path"] = self.root_path + (urllib.parse.unquote(path) if "%" in path else path)
        scope["raw_path"] = raw_path
        scope["query_string"] = parsed.query or b""
        http_version = self.parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        admitted = proxy.admit(scope, *route)  # type: ignore[arg-type]
        if admitted is None:
            return None
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        return DirectExchange(self, proxy, scope, *admitted,  # type: ignore[arg-type]
                              keep_alive=keep_alive)

    def run_cycle(self, exchange: DirectExchange, app: ASGIApp) -> None:
        """Serve the rest of ``exchange`` (its whole body is in) with ``app`` on uvicorn's
        ordinary request cycle."""
        cycle = RequestResponseCycle(
            scope=exchange.scope, transport=self.transport, flow=self.flow,  # type: ignore[arg-type]
            logger=self.logger, access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=exchange.keep_alive,
            on_response=self.on_response_complete)
        cycle.body = bytearray(exchange.body)
        cycle.more_body = False
        cycle.disconnected = exchange.disconnected
        cycle.message_event.set()
        if self.cycle is exchange:  # else a pipelined request already took its place
            self.cycle = cycle
        self._start_asgi_task(cycle, app)  # type: ignore[arg-type]

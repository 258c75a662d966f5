"""The gateway's HTTP/1.1 server protocol; the one module that uses uvicorn's internals.

GatewayHttpProtocol is uvicorn's httptools protocol with two changes:

- **One send per answer.** uvicorn writes an answer's head on ``http.response.start``
  and its body on ``http.response.body``: two system calls and two TCP segments for
  every small answer, and the client is woken twice. A :class:`CoalescingTransport`
  holds a write back until the next one, which takes it along, or until the end of the
  event-loop step.
- **Plain proxied requests without the ASGI cycle.** A small request to a serving runner
  is a ``DirectExchange`` (``direct.py``), served from this protocol's callbacks. While
  in flight a :class:`_DirectCycle` stands in as uvicorn's current cycle, so uvicorn's
  own handling of pipelined requests, lost connections and graceful shutdown applies.

These lean on names outside uvicorn's public API (its request cycle and protocol
attributes). :func:`server_protocol` checks at startup that the installed uvicorn has
them; where it does not (or ``MODEL_GATEWAY_FAST_PATH=off``), it logs one warning and
the gateway serves every request through uvicorn's own httptools protocol and the plain
ASGI path, which is complete on its own.
"""

from __future__ import annotations

import asyncio
import http
import inspect
import logging
import os
import urllib.parse
from typing import Any, cast

import httptools

try:  # uvicorn internals: server_protocol() checks them before GatewayHttpProtocol is used
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError:  # pragma: no cover - a uvicorn without them serves the plain path
    HttpToolsProtocol = RequestResponseCycle = object  # type: ignore[assignment, misc]

from .direct import DirectExchange
from .proxy import ModelProxy
from .request import PROXIED, parse_route
from .types import ASGIApp

log = logging.getLogger("model_gateway")

FAST_PATH_ENV = "MODEL_GATEWAY_FAST_PATH"  # "off": the plain ASGI path only
STATUS_LINE = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in http.HTTPStatus}
# What this module uses of uvicorn.protocols.http.httptools_impl.
CYCLE_PARAMETERS = ("scope", "transport", "flow", "logger", "access_logger", "access_log",
                    "default_headers", "message_event", "expect_100_continue", "keep_alive",
                    "on_response")
PROTOCOL_METHODS = ("connection_made", "on_headers_complete", "on_body", "on_message_complete",
                    "on_response_complete")
PROTOCOL_ATTRIBUTES = ("config", "cycle", "expect_100_continue", "limit_concurrency", "parser",
                       "url", "root_path", "scope", "server_state", "flow", "logger",
                       "access_logger", "access_log", "tasks", "loop", "transport")
CYCLE_ATTRIBUTES = ("body", "more_body", "disconnected", "message_event", "response_complete",
                    "keep_alive")


def fast_path_problems() -> list[str]:
    """What the installed uvicorn lacks of what GatewayHttpProtocol uses (empty: nothing)."""
    if os.environ.get(FAST_PATH_ENV, "").lower() in ("off", "0", "false", "no"):
        return [f"turned off by {FAST_PATH_ENV}"]
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError as exc:
        return [f"uvicorn.protocols.http.httptools_impl ({exc})"]
    protocol = getattr(httptools_impl, "HttpToolsProtocol", None)
    cycle = getattr(httptools_impl, "RequestResponseCycle", None)
    if protocol is None or cycle is None:
        return ["HttpToolsProtocol or RequestResponseCycle is gone"]
    problems = [f"HttpToolsProtocol.{name}" for name in PROTOCOL_METHODS
                if not callable(getattr(protocol, name, None))]
    if not callable(getattr(cycle, "run_asgi", None)):
        problems.append("RequestResponseCycle.run_asgi")
    parameters = tuple(inspect.signature(cycle.__init__).parameters)[1:]
    if parameters != CYCLE_PARAMETERS:
        problems.append(f"RequestResponseCycle{parameters}")
    try:
        protocol_source = inspect.getsource(protocol)
        cycle_source = inspect.getsource(cycle)
    except (OSError, TypeError):
        return [*problems, "uvicorn's source cannot be read"]
    problems += [f"HttpToolsProtocol.{name}" for name in PROTOCOL_ATTRIBUTES
                 if f"self.{name}" not in protocol_source]
    problems += [f"RequestResponseCycle.{name}" for name in CYCLE_ATTRIBUTES
                 if f"self.{name}" not in cycle_source]
    return problems


def server_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's ``http`` setting: GatewayHttpProtocol when the installed uvicorn has what
    it needs, else uvicorn's own httptools protocol (with one warning saying why)."""
    problems = fast_path_problems()
    if problems:
        import uvicorn

        log.warning("serving every request through the plain ASGI path (uvicorn %s): the "
                    "fast path needs what this uvicorn lacks: %s", uvicorn.__version__,
                    ", ".join(problems))
        return "httptools"
    return GatewayHttpProtocol


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


class _NothingWaits:
    """uvicorn wakes its cycle's reader when the connection is lost; nothing reads here."""

    @staticmethod
    def set() -> None:
        return None


class _DirectCycle:
    """A DirectExchange as uvicorn's current cycle, and its ServerConnection."""

    __slots__ = ("exchange", "keep_alive", "protocol", "response_complete", "scope")
    message_event = _NothingWaits()

    def __init__(self, protocol: GatewayHttpProtocol, scope: dict[str, Any],
                 keep_alive: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.response_complete = False
        self.exchange: DirectExchange | None = None

    @property
    def disconnected(self) -> bool:
        return self.exchange is not None and self.exchange.disconnected

    @disconnected.setter
    def disconnected(self, value: bool) -> None:
        if self.exchange is not None:
            self.exchange.disconnected = value

    def write_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                     *, head_only: bool, has_length: bool) -> bool:
        line = STATUS_LINE.get(status)
        if line is None:
            return False
        head = [line]
        for name, value in (*self.protocol.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        if not has_length and not head_only and status not in (204, 304):
            head.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if not head_only:
            head.append(body)
        self.protocol.coalescing.send_now(b"".join(head))
        return True

    def finish(self) -> None:
        self.response_complete = True
        protocol = self.protocol
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()

    def fall_back(self, app: ASGIApp, body: bytes) -> None:
        protocol = self.protocol
        cycle = RequestResponseCycle(
            scope=cast(Any, self.scope), transport=protocol.transport, flow=protocol.flow,
            logger=protocol.logger, access_logger=protocol.access_logger,
            access_log=protocol.access_log,
            default_headers=protocol.server_state.default_headers,
            message_event=asyncio.Event(), expect_100_continue=False,
            keep_alive=self.keep_alive, on_response=protocol.on_response_complete)
        cycle.body = cast(Any, body)  # a bytearray in newer uvicorns, read the same way
        cycle.more_body = False
        cycle.disconnected = self.disconnected
        cycle.message_event.set()
        if protocol.cycle is cast(Any, self):  # else a pipelined request already took its place
            protocol.cycle = cycle
        task = protocol.loop.create_task(cycle.run_asgi(cast(Any, app)))
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)

class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescingTransport, serving plain proxied
    requests as DirectExchanges and everything else through ASGI."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.config.app
        self.proxy: ModelProxy | None = app if isinstance(app, ModelProxy) else None
        self._receiving: DirectExchange | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.coalescing = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(cast(asyncio.Transport, self.coalescing))

    def on_headers_complete(self) -> None:
        exchange = self._direct_exchange()
        if exchange is None:
            super().on_headers_complete()
        else:
            self._receiving = exchange
            self.cycle = cast(Any, exchange.connection)

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
        """A DirectExchange for this request, or None when it takes the ASGI path: not
        a proxied route, refused, a body to stream, 100-continue, an upgrade, a
        concurrency limit, or pipelined behind a request still being answered."""
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
        # The scope the ASGI path would build: the access line and, if the request
        # moves to the ASGI path later, ModelProxy read it.
        scope: dict[str, Any] = cast(Any, self.scope)
        path = parsed.path.decode("ascii")
        scope["method"] = self.parser.get_method().decode("ascii")
        scope["path"] = self.root_path + (urllib.parse.unquote(path) if "%" in path else path)
        scope["raw_path"] = raw_path
        scope["query_string"] = parsed.query or b""
        http_version = self.parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        admitted = proxy.admit(scope, *route)
        if admitted is None:
            return None
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        stand_in = _DirectCycle(self, scope, keep_alive)
        stand_in.exchange = DirectExchange(stand_in, proxy, scope, *admitted)
        return stand_in.exchange


"""The gateway's HTTP/1.1 server protocol; the one module that uses uvicorn's internals.

GatewayHttpProtocol is uvicorn's httptools protocol with three changes:

- **One send per answer**, through a CoalescingTransport (``coalescing.py``).
- **Plain proxied requests without the ASGI cycle.** A small request to a serving runner
  is a ``DirectExchange`` (``direct.py``), served from this protocol's callbacks. While
  in flight a :class:`_DirectCycle` stands in as uvicorn's current cycle, so uvicorn's
  own handling of pipelined requests, lost connections and graceful shutdown applies.
- **Every client held to the limits** (README, "The edge"): connections, head size and
  time, body stalls, callers that do not read, no upgrade, no trailer as a header.

These lean on names outside uvicorn's public API (its request cycle and protocol
attributes). :func:`server_protocol` checks at startup that the installed uvicorn has
them; where it does not (or ``MODEL_GATEWAY_FAST_PATH=off``), it logs one warning and
the gateway serves every request through uvicorn's own httptools protocol and the plain
ASGI path, which is complete on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import urllib.parse
from types import SimpleNamespace
from typing import Any, cast

import httptools

try:  # uvicorn internals: server_protocol() checks them before GatewayHttpProtocol is used
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError:  # a uvicorn without them serves the plain path (fast_path_problems)
    HttpToolsProtocol = RequestResponseCycle = object  # type: ignore[assignment, misc]

from .coalescing import CoalescingTransport
from .direct import DirectExchange
from .edge import LINGER_RESET, Deadline, HeadMeter
from .proxy import ModelProxy
from .request import PROXIED, parse_route
from .types import ASGIApp
from .v2_direct import V2Exchange, admit, parse_infer
from .wire import STATUS_LINE, answer, refusal

log = logging.getLogger("model_gateway")

FAST_PATH_ENV = "MODEL_GATEWAY_FAST_PATH"  # "off": the plain ASGI path only
LINGER = 2.0  # seconds a refused caller may go on sending before its connection closes
# What this module uses of uvicorn.protocols.http.httptools_impl.
CYCLE_PARAMETERS = ("scope", "transport", "flow", "logger", "access_logger", "access_log",
                    "default_headers", "message_event", "expect_100_continue", "keep_alive",
                    "on_response")
PROTOCOL_METHODS = ("connection_made", "connection_lost", "data_received", "pause_writing",
                    "resume_writing", "on_message_begin", "on_url", "on_header",
                    "on_headers_complete", "on_body", "on_message_complete",
                    "on_response_complete", "_unset_keepalive_if_required")
PROTOCOL_ATTRIBUTES = ("config", "cycle", "expect_100_continue", "limit_concurrency", "parser",
                       "url", "root_path", "scope", "server_state", "flow", "logger",
                       "access_logger", "access_log", "tasks", "loop", "transport",
                       "connections", "pipeline")
CYCLE_ATTRIBUTES = ("body", "more_body", "disconnected", "message_event", "response_complete",
                    "keep_alive")


def fast_path_problems() -> list[str]:
    """What the installed uvicorn lacks of what GatewayHttpProtocol uses (empty: nothing)."""
    if os.environ.get(FAST_PATH_ENV, "").lower() in ("off", "0", "false", "no"):
        return [f"turned off by {FAST_PATH_ENV}"]
    protocol: Any = HttpToolsProtocol
    cycle: Any = RequestResponseCycle
    if protocol is object:
        return ["uvicorn.protocols.http.httptools_impl.HttpToolsProtocol is gone"]
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


class _DirectCycle:
    """A DirectExchange as uvicorn's current cycle, and its ServerConnection."""

    __slots__ = ("exchange", "keep_alive", "protocol", "response_complete", "scope")
    # uvicorn wakes its cycle's reader when the connection is lost; nothing reads here.
    message_event = SimpleNamespace(set=lambda: None)

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
        self.protocol.coalescing.send_now(answer(
            line, (*self.protocol.server_state.default_headers, *headers), body,
            head_only=head_only, has_length=has_length, keep_alive=self.keep_alive))
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
    """uvicorn's httptools protocol, as the module's docstring says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        proxy = self.config.app
        assert isinstance(proxy, ModelProxy), "GatewayHttpProtocol serves a ModelProxy"
        self.proxy = proxy
        self.settings = proxy.settings  # one snapshot per connection
        self._receiving: DirectExchange | None = None
        self._meter = HeadMeter(self.settings.max_header_size)
        self._in_body = False  # between a head and the end of its body
        self._body_seen = 0.0
        self._reading = Deadline(self.loop)  # a head, or a body
        self._sending = Deadline(self.loop)
        self._on_writable: list[Any] = []
        self._refused = False

    # -- connection -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.coalescing = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(cast(asyncio.Transport, self.coalescing))
        if len(self.connections) > self.settings.max_connections:
            self._count("connection_limit")
            self._refused = True
            self.transport.close()
            return
        self._reading.arm(self.settings.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._reading.disarm()
        self._sending.disarm()
        self._on_writable.clear()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        meter = self._meter
        if meter.open and meter.feed(data):
            self._refuse(431, "headers_too_large", "request headers exceed max_header_size "
                         f"({self.settings.max_header_size} bytes)")
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # refused in on_headers_complete: nothing after the head is read
        except httptools.HttpParserError:
            self._refuse(400, "bad_request", "invalid HTTP request")
            return
        # Deadlines only for what did not arrive whole in this read (a timer armed and
        # cancelled per request would cost every request a little).
        if self._refused or self._reading.armed:
            return
        if self._in_body:  # a body still arriving: it may not stall for body_timeout
            self._body_seen = self.loop.time()
            self._reading.arm(self.settings.body_timeout, self._body_timed_out)
        elif meter.open and meter.size:  # a head: header_timeout from now
            self._reading.arm(self.settings.header_timeout, self._head_timed_out)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._sending.arm(self.settings.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._sending.disarm()
        callbacks, self._on_writable = self._on_writable, []
        for callback in callbacks:
            callback()

    def on_response_complete(self) -> None:
        """An answer is written. The next pipelined request is served once the caller has
        read enough of what it was sent: one that does not read gets nothing more served
        (its answers would pile up in the gateway's memory) until send_timeout drops it."""
        if self.flow.write_paused and not self.transport.is_closing():
            self.flow.pause_reading()
            self._on_writable.append(super().on_response_complete)
            return
        super().on_response_complete()

    # -- parser callbacks -----------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if self._reading.armed:
            self._reading.disarm()
        size = self._meter.size
        if self._meter.open:  # a head pipelined after another in one read: measure it here
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        self._meter.open = False
        if size > self.settings.max_header_size:
            self._refuse(431, "headers_too_large", "request headers exceed max_header_size "
                         f"({self.settings.max_header_size} bytes)")
            return
        if self.parser.should_upgrade():
            self._refuse(400, "upgrade_not_supported",
                         "the gateway supports no protocol upgrade")
            return
        self._in_body = True
        exchange = self._direct_exchange()
        if exchange is None:
            super().on_headers_complete()
        else:
            self._receiving = exchange
            self.cycle = cast(Any, exchange.connection)
        # A chunked body's trailer fields arrive through on_header too: into a list no
        # request reads, never into the request's headers (the scope keeps its own).
        self.headers = []

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_seen = self.loop.time()
        if self._receiving is not None:
            self._receiving.receive(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        if self._reading.armed:
            self._reading.disarm()
        self._meter.start()
        exchange, self._receiving = self._receiving, None
        if exchange is not None:
            exchange.dispatch()
        else:
            super().on_message_complete()

    # -- limits ---------------------------------------------------------------------------
    def _head_timed_out(self) -> None:
        if self.flow.read_paused and not self._refused:  # the gateway stopped reading, not
            self._reading.arm(self.settings.header_timeout, self._head_timed_out)  # the caller
            return
        if self._meter.size == 0 and (self.cycle is None or self.cycle.response_complete):
            self._count("idle")
            self.transport.close()  # nothing asked: nothing to answer
            return
        self._refuse(408, "header_timeout", "the request head did not arrive within "
                     f"header_timeout ({self.settings.header_timeout:g}s)")

    def _body_timed_out(self) -> None:
        if self.flow.read_paused:  # the gateway stopped reading (a full send buffer, a
            self._body_seen = self.loop.time()  # request queued behind another): not a stall
        stalled = self.loop.time() - self._body_seen
        if stalled < self.settings.body_timeout:  # it moved meanwhile: wait the rest
            self._reading.arm(self.settings.body_timeout - stalled, self._body_timed_out)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app sees the caller gone: runner released
            self.cycle.response_complete = True  # answered below: a server stop closes it
            self.cycle.message_event.set()
        self._refuse(408, "body_timeout", "the request body stalled for body_timeout "
                     f"({self.settings.body_timeout:g}s)", own=True)

    def _send_timed_out(self) -> None:
        self._count("send_timeout")
        self._refused = True
        # A reset, not a FIN that would wait behind the unread answers in the kernel's
        # buffers (nginx's reset_timedout_connection): the caller learns it at once.
        with contextlib.suppress(OSError, AttributeError):
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()  # uvicorn's connection_lost releases whatever waits to send

    def _refuse(self, status: int, code: str, message: str, *, own: bool = False) -> None:
        """Answer ``status`` and close. An earlier answer still under way is never
        interleaved: the connection then closes after it (``own``: the refused request
        is the current cycle's, whose answer may already have begun: then cut it)."""
        self._count(code)
        self._refused = True
        self._reading.disarm()
        cycle = self.cycle
        if own and (self.pipeline or getattr(cycle, "response_started", False)):
            self.transport.abort()
            return
        if not own and cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.coalescing.send_now(refusal(STATUS_LINE[status], self.server_state.default_headers,
                                         code, message))
        # A lingering close: a caller still sending would otherwise get a reset that
        # destroys the answer before it reads it. The answer is followed by a FIN, reading
        # stops, and the connection closes LINGER seconds later (or as the server stops).
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.pause_reading()
        self._reading.arm(LINGER, self.transport.close)

    def _count(self, reason: str) -> None:
        self.proxy.metrics.client_error(reason)

    def _direct_exchange(self) -> DirectExchange | None:
        """A DirectExchange (or V2Exchange) for this request, or None: the ASGI path for
        other routes, refusals, streamed bodies, 100-continue, upgrades, pipelining."""
        proxy, cycle = self.proxy, self.cycle
        if self.expect_100_continue or self.limit_concurrency is not None \
                or (cycle is not None and not cycle.response_complete):
            return None
        parsed = httptools.parse_url(self.url)
        raw_path = self.root_path.encode("ascii") + parsed.path
        prefix = proxy.settings.url_prefix
        v2 = proxy.v2 and raw_path.startswith(b"/v2/", len(prefix))
        route = parse_infer(raw_path, prefix) if v2 else parse_route(raw_path, prefix)
        if route is None or not (v2 or route[2] in PROXIED):
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
        stand_in = _DirectCycle(self, scope, http_version != "1.0" and
                                self.parser.should_keep_alive())
        if v2:
            found = admit(proxy.v2, proxy.settings, scope, *route[:2])
            if found is not None:
                stand_in.exchange = V2Exchange(stand_in, proxy, scope, *found, self.loop)
            return stand_in.exchange
        admitted = proxy.admit(scope, *route)
        if admitted is not None:
            stand_in.exchange = DirectExchange(stand_in, proxy, scope, *admitted, self.loop)
        return stand_in.exchange


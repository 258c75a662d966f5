"""The streaming reverse proxy for ``/models/<name>/<alias>/<action>``.

A plain ASGI callable rather than a Starlette route: it is on every prediction's path,
so it parses the path once, checks the caller and the request's size, binds the request
to a runner, and moves bytes through the runner's client (``runners.client``).

The server protocol serves most proxied requests without calling it (``direct.py``),
with the checks of ``admit()`` and the bookkeeping of ``record()``; a request that needs
more than that continues in ``relay()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.responses import Response

from runners import (
    Endpoint,
    ReadTimeout,
    Runner,
    RunnerConnection,
    RunnerPool,
    ServerDisconnected,
    TransportError,
)

from .access import AccessLog
from .auth import InferencePolicy
from .batching import SEEN, SLOT, Batcher
from .errors import Refusal, json_error, map_error, send_error
from .history import History
from .inference_log import Body, InferenceLogs
from .metrics import GatewayMetrics
from .request import (
    PROXIED,
    ROUTE,
    SMALL_BODY,
    BodyTooLarge,
    ClientDisconnected,
    IncomingRequest,
    parse_route,
    read_body,
)
from .settings import ProxySettings
from .shadow import ShadowTraffic
from .splits import Key
from .types import ASGIApp, Receive, Scope, Send

access_logger = logging.getLogger("model_gateway.access")
ARM = "model_gateway.arm"  # scope key: the arm a routing endpoint's request goes to

UNAUTHORIZED = [(b"www-authenticate", b'Bearer realm="model-gateway"')]


class ModelProxy:
    """Serves proxied model routes itself and hands every other request to ``app``.

    ``settings`` is swapped whole on a config reload; each request reads it once.
    """

    def __init__(self, app: ASGIApp, pool: RunnerPool, metrics: GatewayMetrics,
                 history: History) -> None:
        self.app = app
        self.pool = pool
        self.metrics = metrics
        self.history = history  # what the status page draws
        self.settings = ProxySettings(policy=InferencePolicy([], []))
        self._identities: weakref.WeakKeyDictionary[Runner, list[tuple[bytes, bytes]]] = \
            weakref.WeakKeyDictionary()
        self.access_log = AccessLog(access_logger)
        self.batchers: dict[tuple[str, str], Batcher] = {}
        # Per routing endpoint, the requests each arm was sent (status: observed shares).
        self.split_counts: dict[Key, dict[Key, int]] = {}
        self.v2: Any = None  # the V2 routes (v2.OpenInference), for V2 on the direct path
        self.shadows = ShadowTraffic(pool, metrics, self.shadow_outcome)
        self.logs = InferenceLogs(metrics.inference_log_lines)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode()
            prefix = self.settings.url_prefix
            route = parse_route(raw_path, prefix)
            if route is not None and route[2] in PROXIED:
                await self.proxy(scope, receive, send, *route)
                return
            if prefix:
                outside = self._outside_prefix(raw_path.split(b"?", 1)[0], prefix)
                if outside is not None:
                    await outside(scope, receive, send)
                    return
                # Starlette routes on the path below root_path.
                scope = {**scope, "root_path": scope.get("root_path", "") + prefix.decode()}
        await self.app(scope, receive, send)

    @staticmethod
    def _outside_prefix(path: bytes, prefix: bytes) -> Response | None:
        """The answer to a path not under ``server.url_prefix``; None when it is under it.
        The prefix alone is redirected to ``<prefix>/`` (the status page), by path only:
        a Location built from the Host header could point anywhere."""
        if path == prefix:
            return Response(status_code=308, headers={"location": prefix.decode() + "/"})
        if not path.startswith(prefix + b"/"):
            return json_error(404, "not_found", "no such route")
        return None

    def identity(self, runner: Runner) -> list[tuple[bytes, bytes]]:
        """The headers every answer from ``runner`` carries: the version and URI served."""
        headers = self._identities.get(runner)
        if headers is None:
            headers = self._identities[runner] = [
                (b"x-model-version", (runner.version or "-").encode()),
                (b"x-model-uri", runner.model_uri.encode()),
                (b"x-model-alias", quote(runner.spec.alias, safe="").encode())]
        return headers

    def route(self, scope: Scope, name: str, alias: str) -> tuple[Endpoint | None, Key]:
        """The endpoint that serves a request to ``name/alias``, and the key its caller is
        checked against: the endpoint itself, or for a routing endpoint the arm picked
        for this request (once: a request that moves to the ASGI path keeps its arm)."""
        key = (name, alias)
        ep = self.pool.endpoints.get(key)
        if ep is not None:
            return ep, key
        split = self.settings.splits.get(key)
        if split is None:
            return None, key
        arm = scope.get(ARM)
        if arm is None:
            arm = scope[ARM] = split.pick(scope["headers"])
            scope[ROUTE] = key
            counts = self.split_counts.setdefault(key, {})
            counts[arm] = counts.get(arm, 0) + 1
            self.metrics.split_request(key, arm)
        return self.pool.endpoints.get(arm), key

    def answered(self, ep: Endpoint, request: IncomingRequest,
                 body: bytes | AsyncIterator[bytes], status: int, answer: bytes,
                 runner: Runner) -> None:
        """The endpoint's whole answer was sent: a copy for its shadow and a line for its
        inference log, when it has them and this is a prediction in their share."""
        settings = self.settings
        if request.action != "invocations" or not isinstance(body, bytes) or \
                not (settings.shadows or settings.logs):
            return
        spec = settings.shadows.get(ep.key)
        if spec is not None:
            self.shadows.offer(ep, spec, request.content_type, body, status, answer,
                               request.request_id)
        logs = settings.logs.get(ep.key)
        if logs is not None and (file := self.logs.sampled(ep.key, logs)) is not None:
            file.add({
                "time": round(time.time(), 3), "endpoint": ep.label,
                "route": f"{request.route[0]}/{request.route[1]}" if request.route else None,
                "version": runner.version, "model_uri": runner.model_uri,
                "request_id": request.request_id.decode("latin-1"), "status": status,
                "latency_ms": round((time.perf_counter() - request.started) * 1000, 3),
                "request": Body(body, request.content_type, logs.max_body),
                "response": Body(answer, None, logs.max_body)})

    def shadow_outcome(self, ep: Endpoint, request_id: bytes, to: Key, outcome: str,
                       seconds: float) -> None:
        """A shadow's comparison, for the primary's inference log."""
        logs = self.settings.logs.get(ep.key)
        if logs is not None and (file := self.logs.sampled(ep.key, logs)) is not None:
            file.add({"time": round(time.time(), 3), "endpoint": ep.label,
                      "request_id": request_id.decode("latin-1"),
                      "shadow": f"{to[0]}/{to[1]}", "outcome": outcome,
                      "latency_ms": round(seconds * 1000, 3)})

    def batcher(self, ep: Endpoint, request: IncomingRequest, scope: Scope) -> Batcher | None:
        """The endpoint's batcher, when the request is a prediction it has not seen yet."""
        spec = ep.spec.batching
        if spec is None or request.action != "invocations" or request.method != "POST" or \
                SEEN in scope:
            return None
        batcher = self.batchers.get(ep.key)
        if batcher is None or batcher.ep is not ep or batcher.spec != spec:
            batcher = self.batchers[ep.key] = Batcher(ep, self.pool, self.metrics)
        return batcher

    def admit(self, scope: Scope, name: str, alias: str, action: str
              ) -> tuple[Endpoint, IncomingRequest] | None:
        """The endpoint and request when ``scope`` may be served without the ASGI cycle
        (``direct.py``): declared, not refused, and a body that is absent or small enough
        to send in one piece. Anything else takes ``proxy()``, which answers it."""
        ep, key = self.route(scope, name, alias)
        if ep is None:
            return None
        request = IncomingRequest(scope, action)
        length = request.content_length
        if (length is None and request.method in ("POST", "PUT")) or \
                (length is not None and length > SMALL_BODY) or \
                self._refusal(request, key, action, self.settings) is not None:
            return None
        return ep, request

    @staticmethod
    def _refusal(request: IncomingRequest, key: tuple[str, str], action: str,
                 settings: ProxySettings) -> Refusal | None:
        """Why this request is refused before it reaches a runner, or None."""
        method = request.method
        if method != PROXIED[action] and not (action != "invocations" and method == "HEAD"):
            return 405, "method_not_allowed", f"{action} accepts {PROXIED[action]} only", \
                [(b"allow", PROXIED[action].encode())]
        if request.header_bytes > settings.max_header_size:
            return 431, "headers_too_large", "request headers exceed max_header_size " \
                f"({settings.max_header_size} bytes)", []
        if not settings.policy.allows(key, request.authorization):
            return 401, "unauthorized", "a valid api key is required", UNAUTHORIZED
        if request.content_length is not None and \
                request.content_length > settings.max_body_size:
            return 413, "body_too_large", \
                f"request body exceeds max_body_size ({settings.max_body_size} bytes)", []
        return None

    async def proxy(self, scope: Scope, receive: Receive, send: Send,
                    name: str, alias: str, action: str) -> None:
        settings = self.settings
        ep, key = self.route(scope, name, alias)
        if ep is None:
            await send_error(send, 404, "endpoint_not_found",
                             "no endpoint is declared with that name and alias")
            return
        request = IncomingRequest(scope, action)
        started = request.started
        request_id = (b"x-request-id", request.request_id)
        refusal = self._refusal(request, key, action, settings)
        if refusal is not None:
            status, code, message, extra = refusal
            await send_error(send, status, code, message, [*extra, request_id])
            self.record(scope, ep, None, status, started, request.request_id)
            return
        status, runner, served = 500, None, None
        try:
            # A body that fits in memory is read before a runner is bound: a caller that
            # stalls mid-body holds no runner (and the edge's body_timeout ends it).
            body = await read_body(request, receive, settings.max_body_size)
            batcher = self.batcher(ep, request, scope)
            if batcher is not None and isinstance(body, bytes):
                member = _Queued()
                if batcher.offer(scope, request.content_type, body, member):
                    merged = await member.future
                    if merged is not None:  # its part of a merged answer
                        status, served = merged[0], merged[3]
                        await _send_answer(send, *merged[:3], [*self.identity(served),
                                                               request_id])
                        self.answered(ep, request, body, status, merged[2], served)
                        return
            try:
                runner = await self.pool.acquire(ep, scope["headers"])
            except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
                status, code, message, extra = map_error(exc, ep.label)
                await send_error(send, status, code, message, [*extra, request_id])
                return
            deadline = time.monotonic() + ep.spec.request_timeout
            status = await self.relay(request, body, send, ep, runner, deadline)
        except BodyTooLarge:
            status = 413
            await send_error(send, status, "body_too_large", "request body exceeds "
                             f"max_body_size ({settings.max_body_size} bytes)", [request_id])
        except ClientDisconnected:
            status = 499  # nobody is left to answer
        finally:
            if runner is not None:
                self.pool.release(ep, runner)
            self.record(scope, ep, runner or served, status, started, request.request_id)

    async def relay(self, request: IncomingRequest, body: bytes | AsyncIterator[bytes],
                    send: Send, ep: Endpoint, runner: Runner, deadline: float,
                    sent: RunnerConnection | None = None) -> int:
        """Send the request to ``runner`` (unless it was ``sent`` already) and its answer
        to the caller; the answer's status, or the error status the caller was sent."""
        identity = self.identity(runner)
        request_id = (b"x-request-id", request.request_id)
        try:
            response = await runner.client.exchange(request, body, deadline, sent=sent)
        except TransportError as exc:
            if isinstance(exc, ReadTimeout) and runner.exited.is_set():
                exc = ServerDisconnected("the runner exited")
            status, code, message, extra = map_error(exc, ep.label)
            await send_error(send, status, code, message, [*extra, request_id, identity[0]])
            return status
        async with response:
            start = {"type": "http.response.start", "status": response.status,
                     "headers": [*response.headers, *identity, request_id]}
            await send(start)
            if response.complete:  # the whole answer is in: send it in one piece
                data = response.read_buffered()
                await send({"type": "http.response.body", "body": data})
                self.answered(ep, request, body, response.status, data, runner)
            else:  # the status line is out; a failure now can only cut the answer short
                async for chunk in response.iter_body(ep.spec.request_timeout):
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            return response.status

    def record(self, scope: Scope, ep: Endpoint, runner: Runner | None, status: int,
               started: float, request_id: bytes) -> None:
        """Count the request and write its access line; hand back its batching slot."""
        batcher = scope.pop(SLOT, None)
        if batcher is not None:
            batcher.done()
        seconds = time.perf_counter() - started
        if runner is not None:  # a rollout judges its versions by what callers got
            ep.observe(runner, status, seconds)
        self.metrics.observe_request(ep.spec.name, ep.spec.alias, status, seconds)
        self.history.observe_request(ep.spec.name, ep.spec.alias, status, seconds)
        if self.access_log.enabled():
            # The raw path, not the decoded one: %0A must not start a log line of its own.
            route = (scope.get("raw_path") or b"").decode("ascii", "backslashreplace") \
                or scope["path"]
            self.access_log.add((scope["method"], route, status), {
                "method": scope["method"], "route": route,
                "endpoint": ep.label, "version": runner.version if runner else None,
                "status": status, "duration_ms": round(seconds * 1000, 2),
                "request_id": request_id.decode("latin-1")})


class _Queued:
    """A request of the ASGI path while its endpoint's batcher holds it."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, Runner] | None] \
            = asyncio.get_running_loop().create_future()

    def alone(self) -> bool:
        if self.future.done():  # cancelled: the caller's task is gone
            return False
        self.future.set_result(None)
        return True

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
               runner: Runner) -> None:
        if not self.future.done():
            self.future.set_result((status, headers, body, runner))


async def _send_answer(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body)), *extra]})
    await send({"type": "http.response.body", "body": body})

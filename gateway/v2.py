"""The Open Inference Protocol (KServe's V2) over REST, on the gateway's own endpoints.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          the gateway's liveness and readiness
    GET  /v2/models/{name}[/versions/{alias}]       model metadata from the MLflow signature
    GET  /v2/models/{name}[/versions/{alias}]/ready whether an inference would be served
    POST /v2/models/{name}[/versions/{alias}]/infer an inference, through MLflow's protocol

The V2 version is the endpoint's alias; without one, the endpoint marked ``default:
true`` for the name (or the only one declared for it). Auth is that of ``/models/…``;
errors are the protocol's ``{"error": "…"}``. The translation is ``v2_codec``'s.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import Endpoint, ResolveError, RunnerPool, State, TransportError
from runners.signature import ModelCatalog, ModelMetadata

from .auth import InferencePolicy
from .errors import map_error
from .proxy import ModelProxy
from .request import SAFE_REQUEST_ID
from .types import ASGIApp, Receive, Scope, Send
from .v2_codec import V2Error, mlflow_body, mlflow_message, model_metadata, v2_answer

log = logging.getLogger("model_gateway")

VERSION = "0.1.0"
EXTENSIONS = ["model_repository_health"]
JSON = [(b"content-type", b"application/json")]


class OpenInference:
    """The V2 routes. ``defaults``: model name → the alias its version-less routes use."""

    def __init__(self, pool: RunnerPool, catalog: ModelCatalog, proxy: Callable[[], ModelProxy],
                 ready: Callable[[], bool]) -> None:
        self.pool = pool
        self.catalog = catalog
        self._proxy = proxy
        self._ready = ready
        self.defaults: dict[str, str] = {}

    @property
    def policy(self) -> InferencePolicy:
        return self._proxy().settings.policy

    @property
    def proxy(self) -> ModelProxy:
        return self._proxy()

    # -- which endpoint -------------------------------------------------------------------
    def endpoint(self, params: dict[str, Any]) -> Endpoint:
        name, alias = params["name"], params.get("alias")
        if alias is None:
            alias = self.defaults.get(name)
            if alias is None:
                aliases = [a for n, a in self.pool.endpoints if n == name]
                if len(aliases) > 1:
                    raise V2Error(f"model {name!r} has several versions ({', '.join(aliases)}) "
                                  "and none is marked default: name one as "
                                  f"/v2/models/{name}/versions/<alias>", 404)
                alias = aliases[0] if aliases else None
        ep = self.pool.endpoints.get((name, alias)) if alias is not None else None
        if ep is None:
            raise V2Error(f"no model {name!r}" + (f" with version {alias!r}" if alias else "")
                          + " is declared", 404)
        return ep

    def _allowed(self, ep: Endpoint, authorization: str | None) -> None:
        if not self.policy.allows(ep.key, authorization):
            raise V2Error("a valid api key is required", 401)

    # -- routes ---------------------------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "mlflow-model-gateway", "version": VERSION,
                             "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        ready = self._ready() and not self.pool.not_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metadata(self, request: Request) -> Response:
        try:
            ep = self.endpoint(request.path_params)
            self._allowed(ep, request.headers.get("authorization"))
            meta = await self._metadata(ep)
        except V2Error as exc:
            return error(exc)
        return JSONResponse(model_metadata(request.path_params["name"], meta.version, meta))

    async def model_ready(self, request: Request) -> Response:
        """Ready unless the endpoint cannot serve now: a cold one starts on the first
        inference (it is served, only later), a failed one is waiting for its backoff."""
        try:
            ep = self.endpoint(request.path_params)
            self._allowed(ep, request.headers.get("authorization"))
        except V2Error as exc:
            return error(exc)
        ready = ep.state not in (State.FAILED, State.STOPPING)
        return JSONResponse({"name": ep.spec.name, "ready": ready, "state": ep.state.value},
                            status_code=200 if ready else 400)

    async def _metadata(self, ep: Endpoint) -> ModelMetadata:
        try:
            return await self.catalog.metadata(ep)
        except (ResolveError, TransportError) as exc:
            raise V2Error(f"{ep.label}: the model's signature cannot be read ({exc})",
                          503) from exc

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST …/infer, as a plain ASGI app: on every V2 prediction's path."""
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given if SAFE_REQUEST_ID.fullmatch(given) else \
            b"%032x" % random.getrandbits(128)
        ep, runner, status = None, None, 500
        try:
            ep = self.endpoint(scope["path_params"])
            auth = headers.get(b"authorization")
            self._allowed(ep, auth.decode("latin-1") if auth is not None else None)
            if b"inference-header-content-length" in headers:
                raise V2Error("binary tensor data is not supported: send JSON "
                              "(tritonclient: binary_data=False)")
            request = _decode(await _read_body(receive, self._proxy().settings.max_body_size))
            meta = await self._metadata(ep)
            body = mlflow_body(request, meta)
            try:
                runner = await self.pool.acquire(ep)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a V2 error
                status, _, message, extra = map_error(exc, ep.label)
                await _send(send, status, {"error": message}, [*extra, (b"x-request-id",
                                                                        request_id)])
                return
            try:
                status, answer = await runner.client.request(
                    "POST", "/invocations", body=body, timeout=ep.spec.request_timeout,
                    headers=[*JSON, (b"x-request-id", request_id)])
            except TransportError as exc:
                status, _, message, extra = map_error(exc, ep.label)
                await _send(send, status, {"error": message}, [*extra, (b"x-request-id",
                                                                        request_id)])
                return
            identity = [*self._proxy().identity(runner), (b"x-request-id", request_id)]
            if status != 200:
                await _send(send, status, {"error": mlflow_message(answer, status)}, identity)
                return
            await _send(send, 200, v2_answer(ep.spec.name, runner.version, request,
                                             json.loads(answer), meta), identity)
        except V2Error as exc:
            status = exc.status
            extra = [(b"www-authenticate", b'Bearer realm="model-gateway"')] \
                if status == 401 else []
            await _send(send, status, {"error": str(exc)}, [*extra, (b"x-request-id",
                                                                     request_id)])
        except ValueError:  # the runner's answer was not JSON
            status = 502
            await _send(send, status, {"error": "the runner's answer is not JSON"}, [])
        except Exception:  # never a traceback to the caller
            log.exception("V2 inference failed")
            status = 500
            await _send(send, status, {"error": "internal error"}, [])
        finally:
            if runner is not None and ep is not None:
                self.pool.release(ep, runner)
            if ep is not None:
                self._proxy().record(scope, ep, runner, status, started, request_id)

    def front(self, app: ASGIApp) -> ASGIApp:
        """``app`` with V2 inferences taken before it (see :class:`_Front`)."""
        return _Front(self.infer, app)

    def routes(self) -> list[Route]:
        one = "/v2/models/{name}"
        named = "/v2/models/{name}/versions/{alias}"
        infer = _AsgiRoute(self.infer)
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.server_ready, methods=["GET"]),
            Route(one, self.metadata, methods=["GET"]),
            Route(named, self.metadata, methods=["GET"]),
            Route(f"{one}/ready", self.model_ready, methods=["GET"]),
            Route(f"{named}/ready", self.model_ready, methods=["GET"]),
            Route(f"{one}/infer", infer, methods=["POST"]),
            Route(f"{named}/infer", infer, methods=["POST"]),
        ]


INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class _Front:
    """``POST …/infer`` straight to the V2 handler (no router, no middleware: it is on
    every V2 prediction's path); every other request to ``app``."""

    def __init__(self, infer: Callable[[Scope, Receive, Send], Any], app: ASGIApp) -> None:
        self.infer = infer
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            match = INFER.fullmatch(path)
            if match is not None:
                params = {"name": match[1]} if match[2] is None else \
                    {"name": match[1], "alias": match[2]}
                await self.infer({**scope, "path_params": params}, receive, send)
                return
        await self.app(scope, receive, send)


class _AsgiRoute:
    """A plain ASGI app as a Starlette route's endpoint (no Request/Response objects)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def error(exc: V2Error) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="model-gateway"'} if exc.status == 401 \
        else None
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise V2Error("the client went away", 499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise V2Error(f"request body exceeds max_body_size ({limit} bytes)", 413)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise V2Error("the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise V2Error("the request must be a JSON object")
    return request


async def _send(send: Send, status: int, body: dict[str, Any],
                headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON, (b"content-length", b"%d" % len(data)), *headers]})
    await send({"type": "http.response.body", "body": data})

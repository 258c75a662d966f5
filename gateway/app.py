"""The gateway application: config in, one ASGI app out, runners owned by its lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import Endpoint, RunnerPool, VersionWatcher

from .auth import TokenSet, bearer
from .config import GatewayConfig
from .metrics import CONTENT_TYPE, GatewayMetrics
from .proxy import ModelProxy
from .webhooks import WebhookRejected, WebhookVerifier

log = logging.getLogger("model_gateway")


class Gateway:
    """Holds what one running gateway owns: its config, runner pool and version watcher."""

    def __init__(self, config: GatewayConfig, *, owner: str | None = None) -> None:
        self.config = config
        self.owner = owner or f"gateway@{config.server.host}:{config.server.port}"
        self.metrics = GatewayMetrics()
        self.pool = RunnerPool(config.pool_spec(), config.endpoint_specs(), self.owner,
                               events=self.metrics)
        self.metrics.watch(self.pool)
        self.watcher = VersionWatcher(self.pool)
        self.admin_tokens = TokenSet(config.auth.admin_tokens)
        self.webhooks = WebhookVerifier(config.webhook_secret) if config.webhook_secret else None
        self.ready = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.pool.start()
        self.watcher.start()
        self.ready = True
        log.info("gateway ready with %d endpoints", len(self.pool.endpoints))
        try:
            yield
        finally:
            self.ready = False
            await self.watcher.close()
            await self.pool.close()
            log.info("gateway stopped; all runners stopped")

    # -- routes ---------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        waiting = self.pool.not_ready()
        if waiting:  # names and states only: no URIs, paths or tokens on a probe route
            reasons = [w.split(" (", 1)[0] for w in waiting]
            return JSONResponse({"status": "waiting for preloaded endpoints",
                                 "endpoints": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "endpoints": len(self.pool.endpoints)})

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"endpoints": [ep.status() for ep in self.pool.endpoints.values()]})

    async def model_status(self, request: Request) -> Response:
        ep = self.pool.endpoints.get((request.path_params["name"], request.path_params["alias"]))
        if ep is None:
            return _json_error(404, "endpoint_not_found",
                               "no endpoint is declared with that name and alias")
        return JSONResponse(ep.status())

    def _endpoint(self, request: Request) -> Endpoint | None:
        return self.pool.endpoints.get((request.path_params["name"],
                                        request.path_params["alias"]))

    def _refuse_admin(self, request: Request) -> Response | None:
        """None when the request carries an admin token; the refusal otherwise."""
        if not self.admin_tokens:
            return _json_error(403, "admin_disabled",
                               "admin routes are disabled: no admin token is configured")
        if not self.admin_tokens.accepts(bearer(request.headers.get("authorization"))):
            return _json_error(401, "unauthorized", "a valid admin token is required",
                               {"WWW-Authenticate": 'Bearer realm="model-gateway-admin"'})
        return None

    async def reload(self, request: Request) -> Response:
        """Re-resolve now; ``?wait=true`` answers after the cutover (if any) is done."""
        refused = self._refuse_admin(request)
        if refused is not None:
            return refused
        ep = self._endpoint(request)
        if ep is None:
            return _json_error(404, "endpoint_not_found",
                               "no endpoint is declared with that name and alias")
        if request.query_params.get("wait") in ("1", "true", "yes"):
            await self.watcher.refresh(ep, force=True)
            return JSONResponse(ep.status())
        self.watcher.refresh_now(ep)
        return JSONResponse(ep.status(), status_code=202)

    async def webhook(self, request: Request) -> Response:
        if self.webhooks is None:
            return _json_error(404, "webhooks_disabled", "no webhook_secret is configured")
        body = await request.body()
        try:
            event = self.webhooks.verify(dict(request.headers), body)
        except WebhookRejected as exc:
            self.metrics.webhooks.labels("rejected").inc()
            log.warning("webhook rejected: %s", exc)
            return _json_error(exc.status, exc.code, str(exc))
        self.metrics.webhooks.labels("accepted").inc()
        hits = self.watcher.trigger(event.model_name) if event.model_name else []
        log.info("webhook %s.%s for model %r: re-resolving %d endpoint(s)", event.entity,
                 event.action, event.model_name, len(hits))
        return JSONResponse({"refreshing": [ep.spec.label for ep in hits]})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def routes(self) -> list[Route]:
        return [
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{name}/{alias}", self.model_status, methods=["GET"]),
            Route("/models/{name}/{alias}/reload", self.reload, methods=["POST"]),
            Route("/hooks/mlflow", self.webhook, methods=["POST"]),
        ]


def _json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None
                ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


async def _http_error(request: Request, exc: Any) -> Response:
    assert isinstance(exc, HTTPException)
    # Never echo the raw path back: a generic message per status.
    codes = {404: ("not_found", "no such route"), 405: ("method_not_allowed", "method not allowed")}
    code, message = codes.get(exc.status_code, ("http_error", str(exc.detail)))
    return _json_error(exc.status_code, code, message, getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return _json_error(500, "internal_error", "internal error")


def build_app(config: GatewayConfig, *, owner: str | None = None) -> tuple[ModelProxy, Gateway]:
    """The ASGI app to serve, and the Gateway behind it."""
    gateway = Gateway(config, owner=owner)
    app = Starlette(routes=gateway.routes(), lifespan=gateway.lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    return ModelProxy(app, gateway.pool), gateway

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

from runners import RunnerPool, VersionWatcher

from .config import GatewayConfig
from .proxy import ModelProxy

log = logging.getLogger("model_gateway")


class Gateway:
    """Holds what one running gateway owns: its config, runner pool and version watcher."""

    def __init__(self, config: GatewayConfig, *, owner: str | None = None) -> None:
        self.config = config
        self.owner = owner or f"gateway@{config.server.host}:{config.server.port}"
        self.pool = RunnerPool(config.pool_spec(), config.endpoint_specs(), self.owner)
        self.watcher = VersionWatcher(self.pool)
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

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{name}/{alias}", self.model_status, methods=["GET"]),
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

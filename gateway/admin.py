"""The admin API under ``/admin`` and config reload (also on SIGHUP).

Every route needs an admin token; with none configured the whole API answers 403.
A reloaded config applies as a diff: endpoints added start cold, removed ones drain and
stop, changed ones move to a runner started from the new spec by blue-green. A config
with errors is refused with the named errors and nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import Endpoint, RunnerError

from .auth import TokenSet, bearer
from .config import ConfigError, GatewayConfig, load_config
from .responses import json_error, not_declared
from .webhooks import WebhookVerifier

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("model_gateway.admin")

RESTART_ONLY = ("server", "tracking_uri", "registry_uri")
MAX_LOG_LINES = 50


class ConfigReloader:
    """Applies a new config to a running gateway; one reload at a time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; raises ConfigError (nothing changed) when it is invalid."""
        gw = self.gateway
        if gw.config_path is None:
            raise ConfigError("<config>", ["<file>: this gateway was not started from a file"])
        async with self._lock:
            config = load_config(gw.config_path)
            return await self._apply(config)

    async def _apply(self, new: GatewayConfig) -> dict[str, Any]:
        gw, pool = self.gateway, self.gateway.pool
        old_specs = {s.key: s for s in gw.config.endpoint_specs()}
        new_specs = {s.key: s for s in new.endpoint_specs()}
        restart = [k for k in RESTART_ONLY if getattr(gw.config, k) != getattr(new, k)]
        gw.config = new.model_copy(update={k: getattr(gw.config, k) for k in restart})
        pool.spec = new.pool_spec()
        gw.apply_access(new)
        added = [k for k in new_specs if k not in pool.endpoints]
        removed = [k for k in pool.endpoints if k not in new_specs]
        changed = [k for k in new_specs if k in pool.endpoints and k in old_specs
                   and old_specs[k] != new_specs[k]]
        for key in added:
            pool.add_endpoint(new_specs[key])
        results = await asyncio.gather(
            *(pool.remove_endpoint(k) for k in removed),
            *(gw.watcher.replace(pool.endpoints[k], new_specs[k]) for k in changed),
            return_exceptions=True)
        failed = {f"{k[0]}/{k[1]}": str(r) for k, r in zip(removed + changed, results,
                                                            strict=True)
                  if isinstance(r, BaseException)}
        summary = {"added": _labels(added), "removed": _labels(removed),
                   "changed": _labels(changed), "failed": failed,
                   "restart_required": restart}
        log.info("config reloaded: %s", summary)
        return summary


def _labels(keys: list[tuple[str, str]]) -> list[str]:
    return [f"{name}/{alias}" for name, alias in keys]


class AdminAPI:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.reloader = ConfigReloader(gateway)

    def _refused(self, request: Request) -> Response | None:
        tokens: TokenSet = self.gateway.admin_tokens
        if not tokens:
            return json_error(403, "admin_disabled",
                              "admin routes are disabled: no admin token is configured")
        if not tokens.accepts(bearer(request.headers.get("authorization"))):
            return json_error(401, "unauthorized", "a valid admin token is required",
                              {"WWW-Authenticate": 'Bearer realm="model-gateway-admin"'})
        return None

    def _endpoint(self, request: Request) -> Endpoint | None:
        return self.gateway.pool.endpoints.get((request.path_params["name"],
                                                request.path_params["alias"]))

    def guarded(self, handler: Any) -> Any:
        async def route(request: Request) -> Response:
            refused = self._refused(request)
            if refused is not None:
                return refused
            if "name" in request.path_params:
                ep = self._endpoint(request)
                if ep is None:
                    return not_declared()
                return await handler(request, ep)
            return await handler(request)
        return route

    async def endpoints(self, request: Request) -> Response:
        return JSONResponse({"endpoints": [ep.status() for ep in
                                           self.gateway.pool.endpoints.values()],
                             "live_runners": len(self.gateway.pool.runners),
                             "pool_memory_bytes": self.gateway.pool.memory})

    async def reload_endpoint(self, request: Request, ep: Endpoint) -> Response:
        """Re-resolve now; ``?wait=true`` answers after the cutover (if any) is done."""
        if request.query_params.get("wait") in ("1", "true", "yes"):
            await self.gateway.watcher.refresh(ep, force=True)
            return JSONResponse(ep.status())
        self.gateway.watcher.refresh_now(ep)
        return JSONResponse(ep.status(), status_code=202)

    async def start_endpoint(self, request: Request, ep: Endpoint) -> Response:
        """Warm an endpoint up: answers once its runner is ready (or failed)."""
        try:
            await self.gateway.pool.warm(ep)
        except RunnerError as exc:
            return json_error(503, "runner_unavailable", f"{ep.spec.label}: {exc}")
        return JSONResponse(ep.status())

    async def stop_endpoint(self, request: Request, ep: Endpoint) -> Response:
        await self.gateway.pool.stop_endpoint(ep)
        return JSONResponse(ep.status())

    async def logs(self, request: Request, ep: Endpoint) -> Response:
        try:
            lines = max(1, min(int(request.query_params.get("lines", MAX_LOG_LINES)),
                               MAX_LOG_LINES))
        except ValueError:
            return json_error(400, "bad_request", "lines must be a whole number")
        runner = ep.pending or ep.runner
        tail = runner.tail(lines) if runner is not None else ep.last_output[-lines:]
        return JSONResponse({"endpoint": ep.spec.label, "version": ep.version, "lines": tail})

    async def reload_config(self, request: Request) -> Response:
        try:
            summary = await self.reloader.reload()
        except ConfigError as exc:
            return JSONResponse({"error": {"code": "invalid_config", "message": str(exc),
                                           "errors": exc.errors}}, status_code=400)
        return JSONResponse(summary)

    def routes(self) -> list[Route]:
        g = self.guarded
        base = "/admin/endpoints/{name}/{alias}"
        return [
            Route("/admin/endpoints", g(self.endpoints), methods=["GET"]),
            Route(f"{base}/reload", g(self.reload_endpoint), methods=["POST"]),
            Route(f"{base}/start", g(self.start_endpoint), methods=["POST"]),
            Route(f"{base}/stop", g(self.stop_endpoint), methods=["POST"]),
            Route(f"{base}/logs", g(self.logs), methods=["GET"]),
            Route("/admin/config/reload", g(self.reload_config), methods=["POST"]),
            # The route the follow-the-registry issue started with; same as admin reload.
            Route("/models/{name}/{alias}/reload", g(self.reload_endpoint), methods=["POST"]),
        ]


def webhook_verifier(config: GatewayConfig) -> WebhookVerifier | None:
    return WebhookVerifier(config.webhook_secret) if config.webhook_secret else None

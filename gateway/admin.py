"""The admin API under ``/admin``: endpoint status, warm-up, stop, logs, config reload.

Every route needs an admin token; with none configured the whole API answers 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import Endpoint, RunnerError, RunnerPool, VersionWatcher

from .auth import TokenSet, bearer
from .config import ConfigError
from .errors import json_error, not_declared
from .reload import ConfigReloader

MAX_LOG_LINES = 50


class AdminAPI:
    """``tokens`` returns the admin tokens in force (a reload may change them)."""

    def __init__(self, pool: RunnerPool, watcher: VersionWatcher, reloader: ConfigReloader,
                 tokens: Callable[[], TokenSet],
                 relay: Callable[[str, str | None], bool] = lambda action, model: False
                 ) -> None:
        """``relay``: pass an action on to the peer gateways (``?all=true``)."""
        self.pool = pool
        self.watcher = watcher
        self.reloader = reloader
        self.tokens = tokens
        self.relay = relay

    def _refused(self, request: Request) -> Response | None:
        tokens = self.tokens()
        if not tokens:
            return json_error(403, "admin_disabled",
                              "admin routes are disabled: no admin token is configured")
        if not tokens.accepts(bearer(request.headers.get("authorization"))):
            return json_error(401, "unauthorized", "a valid admin token is required",
                              {"WWW-Authenticate": 'Bearer realm="model-gateway-admin"'})
        return None

    def check(self, request: Request) -> Response | None:
        """None when ``request`` carries an admin token, else the answer refusing it."""
        return self._refused(request)

    def guarded(self, handler: Callable[..., Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            refused = self._refused(request)
            if refused is not None:
                return refused
            if "name" in request.path_params:
                ep = self.pool.endpoints.get((request.path_params["name"],
                                              request.path_params["alias"]))
                if ep is None:
                    return not_declared()
                return await handler(request, ep)
            return await handler(request)
        return route

    async def endpoints(self, request: Request) -> Response:
        return JSONResponse({"endpoints": [ep.status() for ep in self.pool.endpoints.values()],
                             "live_runners": len(self.pool.runners),
                             "pool_memory_bytes": self.pool.memory})

    async def reload_endpoint(self, request: Request, ep: Endpoint) -> Response:
        """Re-resolve now; ``?wait=true`` answers after the cutover (if any) is done;
        ``?all=true`` has the peers re-resolve the same model too."""
        relayed = _yes(request, "all") and self.relay("refresh", ep.spec.name)
        if _yes(request, "wait"):
            await self.watcher.refresh(ep, force=True)
            return JSONResponse({**ep.status(), "relayed_to_peers": relayed})
        self.watcher.refresh_now(ep)
        return JSONResponse({**ep.status(), "relayed_to_peers": relayed}, status_code=202)

    async def start_endpoint(self, request: Request, ep: Endpoint) -> Response:
        """Warm an endpoint up: answers once its runner is ready (or failed)."""
        try:
            await self.pool.warm(ep)
        except RunnerError as exc:
            return json_error(503, "runner_unavailable", f"{ep.label}: {exc}")
        return JSONResponse(ep.status())

    async def stop_endpoint(self, request: Request, ep: Endpoint) -> Response:
        await self.pool.stop_endpoint(ep)
        return JSONResponse(ep.status())

    async def rollout(self, request: Request, ep: Endpoint) -> Response:
        """``promote`` (to 100 % now), ``abort`` (roll back now), or ``retry`` a version
        that was rolled back; 409 when there is nothing to do."""
        action = request.path_params["action"]
        if action not in ("promote", "abort", "retry"):
            return json_error(404, "not_found", "rollout actions are promote, abort and retry")
        cutover = ep.cutover
        rollout = cutover.rollout if cutover is not None else None
        if action == "retry":
            if not self.watcher.retry(ep):
                return json_error(409, "nothing_to_retry",
                                  f"{ep.label}: no version was rolled back")
            return JSONResponse(ep.status(), status_code=202)
        if rollout is None or rollout.verdict is not None:
            return json_error(409, "no_rollout", f"{ep.label}: no rollout is in progress")
        if action == "promote":
            rollout.promote("promoted by an operator")
        else:
            rollout.roll_back("aborted by an operator")
        # The watcher acts on the verdict within its judging interval: answer after it.
        if ep.refresh_task is not None:
            await asyncio.wait([ep.refresh_task], timeout=5)
        return JSONResponse(ep.status())

    async def logs(self, request: Request, ep: Endpoint) -> Response:
        try:
            lines = max(1, min(int(request.query_params.get("lines", MAX_LOG_LINES)),
                               MAX_LOG_LINES))
        except ValueError:
            return json_error(400, "bad_request", "lines must be a whole number")
        runner = (ep.cutover.runner if ep.cutover else None) or ep.runner
        tail = runner.tail(lines) if runner is not None else ep.last_output[-lines:]
        return JSONResponse({"endpoint": ep.label, "version": ep.version, "lines": tail})

    async def reload_config(self, request: Request) -> Response:
        try:
            summary: dict[str, Any] = await self.reloader.reload()
        except ConfigError as exc:
            return JSONResponse({"error": {"code": "invalid_config", "message": str(exc),
                                           "errors": exc.errors}}, status_code=400)
        # ?all=true: each peer reloads its own config file once this one took.
        summary["relayed_to_peers"] = _yes(request, "all") and self.relay("reload", None)
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
            Route(base + "/rollout/{action:str}", g(self.rollout), methods=["POST"]),
            Route("/admin/config/reload", g(self.reload_config), methods=["POST"]),
            # The route the follow-the-registry issue started with; same as admin reload.
            Route("/models/{name}/{alias}/reload", g(self.reload_endpoint), methods=["POST"]),
        ]


def _yes(request: Request, name: str) -> bool:
    return request.query_params.get(name) in ("1", "true", "yes")

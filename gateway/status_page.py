"""The status page at ``/``: one HTML page and its script, polling ``/status/data``.

The page itself holds no data, so it is served to anyone; the data route shows what the
caller's token may see. No api keys: every endpoint, to anyone. Api keys: the endpoints
the caller's key may call (and ``public`` ones). An admin token: every endpoint and, for
admins only, process details (pids, runner sockets) and the last error's output lines.
The assets ship inside the package: the page works with no network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import Endpoint, RunnerPool

from .auth import InferencePolicy, TokenSet, bearer
from .errors import json_error
from .history import History

ASSETS = {"status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere: no CDN, no inline script, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> bytes:
    return (resources.files("gateway") / "static" / name).read_bytes()


class StatusPage:
    """``policy`` and ``admin_tokens`` return what is in force (a reload may change them)."""

    def __init__(self, pool: RunnerPool, history: History,
                 policy: Callable[[], InferencePolicy],
                 admin_tokens: Callable[[], TokenSet]) -> None:
        self.pool = pool
        self.history = history
        self.policy = policy
        self.admin_tokens = admin_tokens
        self._files = {name: _asset(name) for name in [*ASSETS, "status.html"]}

    async def page(self, request: Request) -> Response:
        return Response(self._files["status.html"], media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in ASSETS:
            return json_error(404, "not_found", "no such route")
        return Response(self._files[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    async def data(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        admin = self.admin_tokens().accepts(bearer(authorization))
        policy = self.policy()
        visible = [ep for ep in self.pool.endpoints.values()
                   if admin or policy.allows(ep.key, authorization)]
        if not visible and not policy.open and not admin:
            return json_error(401, "unauthorized", "a valid api key or admin token is required",
                              {"WWW-Authenticate": 'Bearer realm="model-gateway"'})
        return JSONResponse(self.snapshot(visible, admin=admin, open_=policy.open),
                            headers={"Cache-Control": "no-store"})

    def snapshot(self, visible: list[Endpoint], *, admin: bool, open_: bool) -> dict[str, Any]:
        """Everything the page draws, for the endpoints the caller may see."""
        keys = {ep.key for ep in visible}
        spec = self.pool.spec
        return {
            "now": time.time(),
            "tick": self.history.tick,
            "role": "admin" if admin else ("anyone" if open_ else "caller"),
            "token_needed": not open_ or bool(self.admin_tokens()),
            "pool": {
                "live_runners": len(self.pool.runners),
                "max_runners": spec.max_runners,
                "memory_bytes": self.pool.memory,
                "memory_limit": spec.memory_limit or None,
                # Only counts for a caller who sees part of the pool; the series for all.
                "series": list(self.history.pool_series) if admin or open_ else [],
            },
            "endpoints": [self._endpoint(ep, admin) for ep in visible],
            "events": [e for e in self.history.events if (e["name"], e["alias"]) in keys],
        }

    def _endpoint(self, ep: Endpoint, admin: bool) -> dict[str, Any]:
        out = ep.status(details=admin)
        runner = ep.runner
        out["memory_bytes"] = runner.memory if runner is not None else None
        out["in_flight"] = runner.in_flight if runner is not None else 0
        out["waiting"] = ep.waiters
        out["last_started"] = self.history.last_started.get(ep.key)
        out["series"] = list(self.history.series.get(ep.key, ()))
        if not admin:
            out["last_error"] = None  # output and causes belong to admins
        return out

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/status/data", self.data, methods=["GET"]),
            Route("/status/assets/{file}", self.asset, methods=["GET"]),
        ]

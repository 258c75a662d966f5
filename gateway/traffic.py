"""TrafficAPI: the HTTP side of routing endpoints (``splits``): their status, and new
weights from an admin.

``PUT /admin/endpoints/{name}/{alias}/traffic`` with ``{"champion": 50, "challenger":
50}`` (or ``{"traffic": {...}}``) replaces a routing endpoint's weights at once: the
next request is routed by the new ones. The arms must be declared endpoints that serve a
model, as in the config file; a config reload sets the file's weights again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import RunnerPool

from .errors import json_error, not_declared
from .proxy import ModelProxy
from .splits import Key, Split, check_weights

log = logging.getLogger("model_gateway.admin")

MAX_BODY = 64 * 1024

Guard = Callable[[Callable[..., Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]


class TrafficAPI:
    def __init__(self, proxy: Callable[[], ModelProxy], pool: RunnerPool, guarded: Guard
                 ) -> None:
        self._proxy = proxy  # built after the routes
        self.pool = pool
        self.guarded = guarded  # the admin API's token check

    @property
    def proxy(self) -> ModelProxy:
        return self._proxy()

    def status(self, key: Key) -> dict[str, Any] | None:
        """A routing endpoint's status: weights, sticky header, and per arm its weight,
        the requests it was sent since the gateway started, their share, and its state
        and version; None when ``key`` is not a routing endpoint."""
        split = self.proxy.settings.splits.get(key)
        if split is None:
            return None
        out = split.describe(self.proxy.split_counts.get(key, {}))
        for arm in out["arms"]:
            ep = self.pool.endpoints.get((arm["name"], arm["alias"]))
            arm["state"] = ep.state.value if ep else None
            arm["version"] = ep.version if ep else None
        return out

    def keys(self) -> list[Key]:
        return list(self.proxy.settings.splits)

    async def set_weights(self, request: Request) -> Response:
        key = (request.path_params["route_name"], request.path_params["route_alias"])
        settings = self.proxy.settings
        split = settings.splits.get(key)
        if split is None:
            if key in self.pool.endpoints:
                return json_error(409, "not_routing", f"{key[0]}/{key[1]} serves a model; "
                                  "only a routing endpoint (traffic) has weights")
            return not_declared()
        body = await request.body()
        try:
            weights = json.loads(body) if len(body) <= MAX_BODY else None
        except (ValueError, RecursionError):
            weights = None
        if isinstance(weights, dict) and isinstance(weights.get("traffic"), dict):
            weights = weights["traffic"]
        if not isinstance(weights, dict) or not weights:
            return json_error(400, "invalid_traffic", 'expected a JSON object of weights, '
                              'e.g. {"champion": 90, "challenger": 10}')
        errors = check_weights(key, weights, set(self.pool.endpoints), set(settings.splits))
        if errors:
            return json_error(400, "invalid_traffic", "; ".join(
                f"{arm}: {message}" if arm is not None else message
                for arm, message in errors))
        sticky = split.sticky.decode() if split.sticky else None
        new = Split.build(key, {str(k): float(v) for k, v in weights.items()}, sticky)
        if self.proxy.settings is not settings:  # a reload landed meanwhile: retry
            return json_error(409, "conflict", "the config was reloaded meanwhile; send "
                              "the weights again")
        self.proxy.settings = dataclasses.replace(settings,
                                                  splits={**settings.splits, key: new})
        log.info("traffic of %s/%s set to %s", key[0], key[1], new.weights())
        return JSONResponse(self.status(key))

    def routes(self) -> list[Route]:
        return [Route("/admin/endpoints/{route_name}/{route_alias}/traffic",
                      self.guarded(self.set_weights), methods=["PUT"])]

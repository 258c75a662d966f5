"""The gateway application: config in, one ASGI app out, runners owned by its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runners import EventFanout, Fork, RunnerPool, VersionWatcher
from runners.signature import ModelCatalog

from .admin import AdminAPI
from .auth import TokenSet
from .config import ConfigError, GatewayConfig
from .declared import DeclaredEndpoints, DeploymentsAPI
from .docs_page import DocsPage
from .errors import json_error, not_declared
from .history import History
from .metrics import CONTENT_TYPE, GatewayMetrics
from .openapi import base_document, build
from .peers import RELAY_PATH, SIGNATURE, Peers, PeerVerifier, own_hosts
from .proxy import ModelProxy, access_logger
from .reload import ConfigReloader
from .settings import ProxySettings
from .status_page import StatusPage
from .traffic import TrafficAPI
from .v2 import OpenInference
from .webhooks import WebhookRejected, WebhookVerifier

log = logging.getLogger("model_gateway")


class Gateway:
    """Holds what one running gateway owns: its runner pool, version watcher and proxy."""

    def __init__(self, config: GatewayConfig, *, owner: str | None = None,
                 config_path: str | None = None, fork: Fork | None = None) -> None:
        """``fork``: where the fork launcher's runners come from (default: the zygote)."""
        self.owner = owner or f"gateway@{config.server.host}:{config.server.port}"
        # Endpoints declared at run time (state_dir) join the file's from the start.
        self.declared = DeclaredEndpoints(config.state_dir, config_path)
        config = self.declared.merge(config)
        self.metrics = GatewayMetrics()
        self.history = History()  # what the status page draws
        self.pool = RunnerPool(config.pool_spec(), config.endpoint_specs(), self.owner,
                               events=EventFanout(self.metrics, self.history), fork=fork)
        self.metrics.watch(self.pool)
        self.history.watch(self.pool)
        self.watcher = VersionWatcher(self.pool)
        self.reloader = ConfigReloader(self.pool, self.watcher, config, config_path, self.apply)
        self.reloader.merge = self.declared.merge
        self.admin = AdminAPI(self.pool, self.watcher, self.reloader, lambda: self.admin_tokens,
                              self.relay)
        self.admin_tokens = TokenSet([])
        self.status_page = StatusPage(self.pool, self.history, lambda: self.proxy.settings.policy,
                                      lambda: self.admin_tokens)
        self.catalog = ModelCatalog(self.pool)  # signatures: V2 metadata, OpenAPI
        self.v2 = OpenInference(self.pool, self.catalog, lambda: self.proxy, lambda: self.ready)
        self.docs = DocsPage()
        self.traffic = TrafficAPI(lambda: self.proxy, self.pool, self.admin.guarded)
        self.deployments = DeploymentsAPI(self.declared, self.admin.check, self.reloader.apply,
                                          self._status)
        self.webhooks: WebhookVerifier | None = None
        self.instance = uuid.uuid4().hex  # this process, in its relays to peers
        self.peers: Peers | None = None
        self.peer_verifier: PeerVerifier | None = None
        app = Starlette(routes=self.routes(), lifespan=self.lifespan,
                        exception_handlers={HTTPException: _http_error, Exception: _server_error})
        # No redirect to the path with(out) a trailing slash: Starlette would build it from
        # the caller's Host header.
        app.router.redirect_slashes = False
        self.proxy = ModelProxy(self.v2.front(app), self.pool, self.metrics, self.history)
        self.proxy.v2 = self.v2  # V2 inferences on the server's direct path too
        self.apply(config)
        self.ready = False
        self._hangup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def apply(self, config: GatewayConfig) -> None:
        """What the HTTP side reads per request: set at start and on every config reload."""
        self.admin_tokens = TokenSet(config.auth.admin_tokens)
        self.proxy.settings = ProxySettings.from_config(config)
        access_logger.disabled = not config.access_log
        self.v2.defaults = {e.name: e.alias for e in config.endpoints if e.default}
        if self.webhooks is None or self.webhooks.secret != config.webhook_secret:
            self.webhooks = WebhookVerifier(config.webhook_secret) if config.webhook_secret \
                else None
        secret = config.peer_secret
        if self.peer_verifier is None or self.peer_verifier.secret != secret:
            self.peer_verifier = PeerVerifier(secret) if secret else None
        self.peers = None
        if config.peers.enabled and not secret:
            log.warning("peers are set, but neither peers.secret nor webhook_secret is: "
                        "nothing is relayed to them (relays must be signed)")
        elif config.peers.enabled and secret:
            self.peers = Peers(config.peers.addresses, config.peers.dns, secret,
                               config.server.port, own_hosts(config.server.host),
                               self.instance, self._count_relay)

    def _count_relay(self, result: str) -> None:
        self.metrics.peer_relays.labels("sent", result).inc()

    def relay(self, action: str, model: str | None) -> bool:
        """Relay to the peers (without waiting for them); False when there are none."""
        if self.peers is None:
            return False
        self.peers.relay(action, model)
        return True

    def hangup(self) -> None:
        """SIGHUP arrived (called from the signal handler): only record it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._hangup.set)

    async def _reload_on_hangup(self) -> None:
        while True:
            await self._hangup.wait()
            self._hangup.clear()
            try:
                await self.reloader.reload()
            except ConfigError as exc:
                log.error("SIGHUP: config not reloaded, nothing changed: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        await self.pool.start()
        self.watcher.start()
        self.pool.spawn(self._reload_on_hangup(), "sighup-reload")
        self.pool.spawn(self.history.run(), "status-history")
        self.ready = True
        log.info("gateway ready with %d endpoints", len(self.pool.endpoints))
        if not self.admin_tokens:
            log.info("admin API disabled: no auth.admin_tokens configured")
        if self.proxy.settings.policy.open:
            log.info("inference routes are open: no auth.api_keys configured")
        try:
            yield
        finally:
            self.ready = False
            await self.proxy.shadows.close()
            await asyncio.to_thread(self.proxy.logs.close)  # what is buffered is written
            if self.peers is not None:
                await self.peers.close()
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
            return JSONResponse({"status": "waiting", "waiting": waiting}, status_code=503)
        return JSONResponse({"status": "ready", "endpoints": len(self.pool.endpoints)})

    async def list_models(self, request: Request) -> Response:
        """The endpoints the caller may call (all, when no api keys are set); process
        details and output lines only in the admin API."""
        policy, key = self.proxy.settings.policy, request.headers.get("authorization")
        visible = [ep.status(details=False) for ep in self.pool.endpoints.values()
                   if policy.allows(ep.key, key)]
        visible += [status for route in self.traffic.keys() if policy.allows(route, key)
                    and (status := self.traffic.status(route)) is not None]
        if not visible and not policy.open:
            return _unauthorized()
        return JSONResponse({"endpoints": visible})

    async def model_status(self, request: Request) -> Response:
        key = (request.path_params["name"], request.path_params["alias"])
        ep = self.pool.endpoints.get(key)
        routing = self.traffic.status(key) if ep is None else None
        if ep is None and routing is None:
            return not_declared()
        if not self.proxy.settings.policy.allows(key, request.headers.get("authorization")):
            return _unauthorized()
        return JSONResponse(routing if ep is None else ep.status(details=False))

    async def webhook(self, request: Request) -> Response:
        if self.webhooks is None:
            return json_error(404, "webhooks_disabled", "no webhook_secret is configured")
        body = await request.body()
        try:
            event = self.webhooks.verify(dict(request.headers), body)
        except WebhookRejected as exc:
            self.metrics.webhooks.labels("rejected").inc()
            log.warning("webhook rejected: %s", exc)
            return json_error(exc.status, exc.code, str(exc))
        self.metrics.webhooks.labels("accepted").inc()
        hits = self.watcher.trigger(event.model_name) if event.model_name else []
        log.info("webhook %s.%s for model %r: re-resolving %d endpoint(s)", event.entity,
                 event.action, event.model_name, len(hits))
        if event.model_name:
            self.relay("refresh", event.model_name)
        return JSONResponse({"refreshing": [ep.label for ep in hits]})

    async def peer_relay(self, request: Request) -> Response:
        """A peer's relay: re-resolve a model (or all) now, or reload the config."""
        if self.peer_verifier is None:
            return json_error(404, "peers_disabled", "no peers.secret or webhook_secret is "
                                                     "configured")
        try:
            message = self.peer_verifier.verify(request.headers.get(SIGNATURE),
                                                await request.body())
        except WebhookRejected as exc:
            self.metrics.peer_relays.labels("received", "rejected").inc()
            log.warning("peer relay rejected: %s", exc)
            return json_error(exc.status, exc.code, str(exc))
        self.metrics.peer_relays.labels("received", "accepted").inc()
        if message.origin == self.instance:  # listed among its own peers: nothing to do
            return JSONResponse({"refreshing": []})
        if message.action == "reload":
            try:
                return JSONResponse(await self.reloader.reload())
            except ConfigError as exc:
                return json_error(400, "invalid_config", str(exc))
        if message.model is not None:
            hits = self.watcher.trigger(message.model)
        else:
            hits = [ep for ep in self.pool.endpoints.values() if ep.target.follows]
            for ep in hits:
                self.watcher.refresh_now(ep)
        log.info("peer relay: re-resolving %d endpoint(s) of model %r", len(hits),
                 message.model)
        return JSONResponse({"refreshing": [ep.label for ep in hits]})

    def _status(self, key: tuple[str, str]) -> dict[str, Any] | None:
        ep = self.pool.endpoints.get(key)
        return ep.status(details=False) if ep is not None else None

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document, with the endpoints the caller may call."""
        policy, key = self.proxy.settings.policy, request.headers.get("authorization")
        visible = [ep for ep in self.pool.endpoints.values() if policy.allows(ep.key, key)]
        base = base_document(self.proxy.settings.url_prefix.decode())
        return JSONResponse(await build(visible, self.catalog.metadata, base))

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def routes(self) -> list[Route]:
        return [
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{name}/{alias}", self.model_status, methods=["GET"]),
            Route("/hooks/mlflow", self.webhook, methods=["POST"]),
            Route(RELAY_PATH, self.peer_relay, methods=["POST"]),
            *self.admin.routes(),
            *self.traffic.routes(),
            *self.status_page.routes(),
            *self.v2.routes(),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            *self.docs.routes(),
            *self.deployments.routes(),
        ]


def _unauthorized() -> Response:
    return json_error(401, "unauthorized", "a valid api key is required",
                      {"WWW-Authenticate": 'Bearer realm="model-gateway"'})


async def _http_error(request: Request, exc: Any) -> Response:
    assert isinstance(exc, HTTPException)
    # Never echo the raw path back: a generic message per status.
    codes = {404: ("not_found", "no such route"), 405: ("method_not_allowed", "method not allowed")}
    code, message = codes.get(exc.status_code, ("http_error", str(exc.detail)))
    return json_error(exc.status_code, code, message, getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %r", request.url.path)
    return json_error(500, "internal_error", "internal error")


def build_app(config: GatewayConfig, *, owner: str | None = None,
              config_path: str | None = None, fork: Fork | None = None
              ) -> tuple[ModelProxy, Gateway]:
    """The ASGI app to serve, and the Gateway behind it."""
    gateway = Gateway(config, owner=owner, config_path=config_path, fork=fork)
    return gateway.proxy, gateway

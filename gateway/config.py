"""The gateway's YAML config: parsed, expanded and validated before anything starts.

Every error names its key path (``endpoints[1].workers: must be ≥ 1``) and all errors
are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError

from runners import BatchingSpec, EndpointSpec, PoolSpec

from .auth import InferencePolicy
from .config_source import expand, key_path_errors
from .config_traffic import (
    BatchingConfig,
    InferenceLogConfig,
    RolloutConfig,
    ShadowConfig,
    off_when_false,
    routing_errors,
)
from .config_types import NAME, Duration, Size, Strict, parse_residency


class ConfigError(Exception):
    """A config file that cannot be used; ``errors`` holds one ``path: message`` per line."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: invalid config\n" + "\n".join(f"  {e}" for e in errors))


def _url_prefix(value: Any) -> Any:
    """``/team/models-gw`` (or ``""``): every route is served under it. A trailing slash
    is dropped; anything but plain path segments is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    value = value.rstrip("/")
    if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
        raise ValueError("must be a path such as /team/gateway: '/'-separated segments of "
                         "letters, digits and ._~-")
    return value


def _state_dir(value: Any) -> Any:
    """A directory the gateway may write (made when missing); never the config file."""
    if not isinstance(value, str) or not value.strip():
        return None if isinstance(value, str) else value
    path = Path(value).expanduser()
    found = next(p for p in (path, *path.parents) if p.exists())
    if (found == path and not path.is_dir()) or not os.access(found, os.W_OK):
        raise ValueError(f"{value!r} is not a directory the gateway can write")
    return str(path)


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Behind a proxy that forwards /<prefix>/… unchanged (ADSP's url prefix): every route,
    # the status page included, is served under it.
    url_prefix: Annotated[str, BeforeValidator(_url_prefix)] = ""


class LimitsConfig(Strict):
    """What one client may cost the gateway; every phase of a request has a deadline."""

    max_connections: int = Field(4096, ge=1)  # more are closed as they arrive
    header_timeout: Duration = Field(10.0, gt=0)  # the whole request head, from its 1st byte
    body_timeout: Duration = Field(30.0, gt=0)  # a request body that stalls this long
    send_timeout: Duration = Field(30.0, gt=0)  # a caller that reads nothing this long


class PoolConfig(Strict):
    max_runners: int = Field(8, ge=1)
    idle_timeout: Duration = 600.0
    queue_timeout: Duration = 30.0
    memory_limit: Size = 0
    health_interval: Duration = Field(10.0, gt=0)
    min_residency: Annotated[float | None, BeforeValidator(parse_residency)] = None
    runner_tcp: bool = False  # runners also listen on a loopback TCP port (benchmarks)


def _peer_address(value: Any) -> Any:
    """``http://host:port``: a peer gateway's base URL, nothing after the port."""
    if isinstance(value, str):
        value = value.rstrip("/")
        if not re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?", value):
            raise ValueError(f"{value!r}: expected http://host:port (a peer's base URL)")
    return value


class PeersConfig(Strict):
    """How to find the other replicas, to relay webhooks and reloads to them."""

    addresses: list[Annotated[str, BeforeValidator(_peer_address)]] = Field(
        default_factory=list)
    dns: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+$")  # every A record, server.port
    secret: str | None = None  # authenticates relays; webhook_secret when empty

    @property
    def enabled(self) -> bool:
        return bool(self.addresses or self.dns)


class AuthConfig(Strict):
    admin_tokens: list[str | None] = Field(default_factory=list)
    api_keys: list[str | None] = Field(default_factory=list)


class EndpointDefaults(Strict):
    env_manager: Literal["local", "virtualenv", "uv", "conda"] = "local"
    launcher: Literal["cli", "direct", "fork"] = "fork"
    workers: int = Field(1, ge=1)
    startup_timeout: Duration = Field(300.0, gt=0)
    request_timeout: Duration = Field(60.0, gt=0)
    poll_interval: Duration = Field(30.0, gt=0)
    drain_timeout: Duration = 30.0
    max_concurrency: int = Field(0, ge=0)
    nice: int = Field(0, ge=0, le=19)  # runners' CPU priority below the gateway's
    # absent: every request is its own predict call
    batching: Annotated[BatchingConfig | None, BeforeValidator(off_when_false)] = None
    inference_log: Annotated[InferenceLogConfig | None,
                             BeforeValidator(off_when_false)] = None
    # absent: a new version takes all traffic once warm (blue-green)
    rollout: Annotated[RolloutConfig | None, BeforeValidator(off_when_false)] = None


class EndpointConfig(Strict):
    name: str = Field(min_length=1, pattern=NAME)
    alias: str = Field(min_length=1, pattern=NAME)
    model_uri: str | None = None
    env_manager: Literal["local", "virtualenv", "uv", "conda"] | None = None
    launcher: Literal["cli", "direct", "fork"] | None = None
    workers: int | None = Field(None, ge=1)
    startup_timeout: Duration | None = Field(None, gt=0)
    request_timeout: Duration | None = Field(None, gt=0)
    poll_interval: Duration | None = Field(None, gt=0)
    drain_timeout: Duration | None = None
    max_concurrency: int | None = Field(None, ge=0)
    nice: int | None = Field(None, ge=0, le=19)
    batching: Annotated[BatchingConfig | None, BeforeValidator(off_when_false)] = None
    inference_log: Annotated[InferenceLogConfig | None,
                             BeforeValidator(off_when_false)] = None
    rollout: Annotated[RolloutConfig | None, BeforeValidator(off_when_false)] = None
    preload: bool = False
    pinned: bool = False
    public: bool = False  # no api key needed even when auth.api_keys is set
    api_keys: list[str | None] | None = None  # this endpoint's own keys, instead of auth's
    default: bool = False  # the V2 route /v2/models/<name> without a version goes here
    # A routing endpoint (gateway/splits.py): no model of its own; each request goes to an
    # arm, by weight. Arms: aliases of the same name, or name/alias of another endpoint.
    traffic: dict[str, Any] | None = None
    sticky: str | None = Field(None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # a header
    shadow: ShadowConfig | None = None


class GatewayConfig(Strict):
    tracking_uri: str | None = None
    registry_uri: str | None = None
    webhook_secret: str | None = None
    env_cache_dir: str | None = None  # model environments for env_manager uv/virtualenv/conda
    # Endpoints declared at run time (admin API, `mlflow deployments`) are kept here.
    state_dir: Annotated[str | None, BeforeValidator(_state_dir)] = None
    access_log: bool = True  # one line per proxied request
    log_format: Literal["text", "json"] = "text"
    max_body_size: Size = Field(64 * 2**20, ge=1)  # 413 beyond it, chunked bodies too
    max_header_size: Size = Field(64 * 2**10, ge=1)  # 431 beyond it
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    peers: PeersConfig = PeersConfig()
    pool: PoolConfig = PoolConfig()
    defaults: EndpointDefaults = EndpointDefaults()
    endpoints: list[EndpointConfig] = Field(default_factory=list)

    def endpoint_specs(self) -> list[EndpointSpec]:
        """Endpoints with the defaults filled in and ``model_uri`` defaulted."""
        specs = []
        for ep in self.endpoints:
            if ep.traffic is not None:  # a routing endpoint: no runner of its own
                continue
            values = self.defaults.model_dump()
            values.update({k: v for k, v in ep.model_dump().items()
                           if v is not None and k not in _HTTP_ONLY})
            for key in _HTTP_ONLY:  # defaults have some of these too
                values.pop(key, None)
            values["model_uri"] = ep.model_uri or f"models:/{ep.name}@{ep.alias}"
            batching = self.defaults.batching if ep.batching is None else ep.batching
            values["batching"] = BatchingSpec(batching.max_batch_size, batching.max_wait) \
                if batching and batching.enabled else None
            rollout = self.defaults.rollout if ep.rollout is None else ep.rollout
            values["rollout"] = rollout.spec() if rollout else None
            specs.append(EndpointSpec(**values))
        return specs

    @property
    def peer_secret(self) -> str | None:
        return self.peers.secret or self.webhook_secret or None

    def inference_policy(self) -> InferencePolicy:
        return InferencePolicy(self.auth.api_keys, [((e.name, e.alias), e.public, e.api_keys)
                                                    for e in self.endpoints])

    def pool_spec(self) -> PoolSpec:
        return PoolSpec(max_runners=self.pool.max_runners, idle_timeout=self.pool.idle_timeout,
                        queue_timeout=self.pool.queue_timeout,
                        memory_limit=self.pool.memory_limit,
                        health_interval=self.pool.health_interval,
                        min_residency=self.pool.min_residency,
                        runner_tcp=self.pool.runner_tcp,
                        env_cache_dir=self.env_cache_dir, tracking_uri=self.tracking_uri,
                        registry_uri=self.registry_uri, state_dir=self.state_dir)


# Endpoint keys the gateway uses, not the runner pool.
_HTTP_ONLY = {"public", "api_keys", "default", "traffic", "sticky", "shadow",
              "inference_log"}


def _duplicates(raw: dict[str, Any]) -> list[str]:
    """Two endpoints with one name/alias pair would make one route ambiguous."""
    seen: dict[tuple[str, str], int] = {}
    errors = []
    endpoints = raw.get("endpoints")
    for i, ep in enumerate(endpoints if isinstance(endpoints, list) else []):
        if isinstance(ep, dict) and "name" in ep and "alias" in ep:
            key = (str(ep["name"]), str(ep["alias"]))
            if key in seen:
                errors.append(f"endpoints[{i}]: duplicate endpoint {key[0]}/{key[1]} "
                              f"(first declared at endpoints[{seen[key]}])")
            else:
                seen[key] = i
    return errors


def _defaults(raw: dict[str, Any]) -> list[str]:
    """At most one ``default: true`` endpoint per model name (the V2 route's target)."""
    first: dict[str, int] = {}
    errors = []
    endpoints = raw.get("endpoints")
    for i, ep in enumerate(endpoints if isinstance(endpoints, list) else []):
        if isinstance(ep, dict) and ep.get("default") is True and "name" in ep:
            name = str(ep["name"])
            if name in first:
                errors.append(f"endpoints[{i}].default: model {name} already has a default "
                              f"endpoint (endpoints[{first[name]}])")
            else:
                first[name] = i
    return errors


def parse_config(text: str, source: str = "<config>",
                 env: dict[str, str] | None = None) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"<root>: not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["<root>: must be a mapping of keys"])
    errors: list[str] = []
    expanded = expand(raw, "", dict(os.environ if env is None else env), errors)
    errors += _duplicates(expanded)
    errors += _defaults(expanded)
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        errors += key_path_errors(exc)
    else:
        errors += routing_errors(config)
    if errors:
        raise ConfigError(source, errors)
    return config


def load_config(path: str | Path, env: dict[str, str] | None = None) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"<file>: cannot read: {exc.strerror}"]) from exc
    return parse_config(text, str(path), env)

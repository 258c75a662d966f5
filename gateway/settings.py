"""ProxySettings: what the proxy reads per request, as one immutable snapshot.

A config reload builds a new snapshot and swaps it in one assignment; a request reads
the snapshot once, so it never sees half of one config and half of another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .auth import InferencePolicy
from .config import GatewayConfig
from .inference_log import LogSpec
from .shadow import ShadowSpec
from .splits import Key, Split, arm_key


@dataclass(frozen=True)
class ProxySettings:
    policy: InferencePolicy
    max_body_size: int = 64 * 2**20
    max_header_size: int = 64 * 2**10
    max_connections: int = 4096
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    url_prefix: bytes = b""  # every route is under it (server.url_prefix)
    splits: Mapping[Key, Split] = field(default_factory=dict)  # routing endpoints
    shadows: Mapping[Key, ShadowSpec] = field(default_factory=dict)  # by primary endpoint
    logs: Mapping[Key, LogSpec] = field(default_factory=dict)  # endpoints that log

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ProxySettings:
        limits = config.limits
        return cls(policy=config.inference_policy(), max_body_size=config.max_body_size,
                   max_header_size=config.max_header_size,
                   max_connections=limits.max_connections,
                   header_timeout=limits.header_timeout, body_timeout=limits.body_timeout,
                   send_timeout=limits.send_timeout,
                   url_prefix=config.server.url_prefix.encode("ascii"),
                   splits={(e.name, e.alias): Split.build((e.name, e.alias), e.traffic,
                                                          e.sticky)
                           for e in config.endpoints if e.traffic is not None},
                   shadows={(e.name, e.alias): ShadowSpec(arm_key(e.name, e.shadow.to),
                                                          e.shadow.percent / 100,
                                                          e.shadow.tolerance)
                            for e in config.endpoints if e.shadow is not None},
                   logs=_logs(config))


def _logs(config: GatewayConfig) -> dict[Key, LogSpec]:
    """Each endpoint's inference log (its own, else the defaults'), when it has one."""
    out = {}
    for e in config.endpoints:
        log = config.defaults.inference_log if e.inference_log is None else e.inference_log
        if log and log.enabled and log.path and e.traffic is None:
            out[(e.name, e.alias)] = LogSpec(log.path, log.sample / 100, log.max_body,
                                             log.max_file_size, log.keep)
    return out

"""ProxySettings: what the proxy reads per request, as one immutable snapshot.

A config reload builds a new snapshot and swaps it in one assignment; a request reads
the snapshot once, so it never sees half of one config and half of another.
"""

from __future__ import annotations

from dataclasses import dataclass

from .auth import InferencePolicy
from .config import GatewayConfig


@dataclass(frozen=True)
class ProxySettings:
    policy: InferencePolicy
    max_body_size: int = 64 * 2**20
    max_header_size: int = 64 * 2**10

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ProxySettings:
        return cls(policy=config.inference_policy(), max_body_size=config.max_body_size,
                   max_header_size=config.max_header_size)

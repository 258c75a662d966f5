"""ConfigReloader: applies a re-read config file to a running gateway, one reload at a time.

A reloaded config applies as a diff: endpoints added start cold, removed ones drain and
stop, changed ones move to a runner started from the new spec by blue-green. Keys that
only a restart can change (the listening address, the registry) are reported, not
applied. A config with errors raises ConfigError and nothing changes. Everything the
HTTP side reads per request (keys, limits, tokens) is swapped by the ``apply`` callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from runners import RunnerPool, VersionWatcher

from .config import ConfigError, GatewayConfig, load_config

log = logging.getLogger("model_gateway.admin")

RESTART_ONLY = ("server", "tracking_uri", "registry_uri")


class ConfigReloader:
    def __init__(self, pool: RunnerPool, watcher: VersionWatcher, config: GatewayConfig,
                 config_path: str | None, apply: Callable[[GatewayConfig], None]) -> None:
        self.pool = pool
        self.watcher = watcher
        self.config = config
        self.config_path = config_path
        self._apply_settings = apply
        self._lock = asyncio.Lock()
        # What the file's config becomes once endpoints declared at run time are added
        # (gateway/declared.py); the identity when there are none.
        self.merge: Callable[[GatewayConfig], GatewayConfig] = lambda config: config

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; raises ConfigError (nothing changed) when it is invalid."""
        if self.config_path is None:
            raise ConfigError("<config>", ["<file>: this gateway was not started from a file"])
        async with self._lock:
            return await self._apply(self.merge(load_config(self.config_path)))

    async def apply(self, new: GatewayConfig) -> dict[str, Any]:
        """Apply ``new`` as a reload would (endpoints declared or removed at run time)."""
        async with self._lock:
            return await self._apply(new)

    async def _apply(self, new: GatewayConfig) -> dict[str, Any]:
        pool = self.pool
        old_specs = {s.key: s for s in self.config.endpoint_specs()}
        new_specs = {s.key: s for s in new.endpoint_specs()}
        restart = [k for k in RESTART_ONLY if getattr(self.config, k) != getattr(new, k)]
        self.config = new.model_copy(update={k: getattr(self.config, k) for k in restart})
        pool.spec = new.pool_spec()
        self._apply_settings(new)
        added = [k for k in new_specs if k not in pool.endpoints]
        removed = [k for k in pool.endpoints if k not in new_specs]
        changed = [k for k in new_specs if k in pool.endpoints and k in old_specs
                   and not old_specs[k].runs_like(new_specs[k])]
        for key in new_specs.keys() & old_specs.keys() & pool.endpoints.keys():
            if key not in changed:  # the same runner serves on; batching may differ
                pool.endpoints[key].spec = new_specs[key]
        for key in added:
            pool.add_endpoint(new_specs[key])
        results = await asyncio.gather(
            *(pool.remove_endpoint(k) for k in removed),
            *(self.watcher.replace(pool.endpoints[k], new_specs[k]) for k in changed),
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

"""ModelCatalog: what an endpoint's model expects and answers, without starting a runner.

The signature (``MLmodel``) and the serving input example of the version an endpoint
serves are read by the resolver process (``runners.resolver``, op ``metadata``) from the
artifact store, once per pinned version: the V2 model metadata and the OpenAPI document
are built from them. A version that moves (a cutover, an alias moved in the registry)
is a new pinned URI, so its metadata is fetched anew.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import HelperUnavailable, ResolveError

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .pool import RunnerPool

HELPER_TIMEOUT = 60.0
MAX_CACHED = 1024  # pinned versions kept; the oldest is dropped past it
RESOLVED_TTL = 10.0  # how long a cold endpoint's resolution is reused (no runner to ask)


@dataclass(frozen=True)
class ModelMetadata:
    """A pinned version's signature, as MLflow writes it in ``MLmodel`` (parsed JSON)."""

    uri: str
    version: str | None
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    params: list[dict[str, Any]] | None = None
    example: Any = None  # the serving input example (a request body), parsed
    flavors: list[str] = field(default_factory=list)

    @classmethod
    def from_answer(cls, answer: dict[str, Any], version: str | None) -> ModelMetadata:
        signature = answer.get("signature") or {}
        example = answer.get("example")
        try:
            parsed = json.loads(example) if isinstance(example, str) else None
        except ValueError:
            parsed = None
        return cls(uri=answer.get("uri") or "", version=version,
                   inputs=_specs(signature.get("inputs")), outputs=_specs(signature.get("outputs")),
                   params=_specs(signature.get("params")), example=parsed,
                   flavors=[str(f) for f in answer.get("flavors") or []])


def _specs(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    return None


class ModelCatalog:
    """Signatures per pinned version, fetched through the pool's resolver process."""

    def __init__(self, pool: RunnerPool) -> None:
        self.pool = pool
        self._cache: dict[str, ModelMetadata] = {}
        self._fetching: dict[str, asyncio.Future[ModelMetadata]] = {}
        self._resolved: dict[tuple[str, str], tuple[float, str, str | None]] = {}

    async def pinned(self, ep: Endpoint) -> tuple[str, str | None]:
        """The pinned URI and version ``ep`` serves now, or would serve if started now."""
        runner = ep.runner
        if runner is not None and runner.serving:
            return runner.model_uri, runner.version
        cached = self._resolved.get(ep.key)
        now = time.monotonic()
        if cached is not None and (cached[0] > now or not ep.target.follows):
            return cached[1], cached[2]
        resolved = await self.pool.resolve(ep.spec.model_uri)
        self._resolved[ep.key] = (now + RESOLVED_TTL, resolved.uri, resolved.version)
        return resolved.uri, resolved.version

    async def metadata(self, ep: Endpoint) -> ModelMetadata:
        """``ep``'s current version's metadata; ResolveError when it cannot be read."""
        uri, version = await self.pinned(ep)
        cached = self._cache.get(uri)
        if cached is not None:
            return cached
        pending = self._fetching.get(uri)
        if pending is None:
            pending = self._fetching[uri] = asyncio.ensure_future(self._fetch(uri, version))
            pending.add_done_callback(lambda _: self._fetching.pop(uri, None))
        return await asyncio.shield(pending)

    async def _fetch(self, uri: str, version: str | None) -> ModelMetadata:
        pool = self.pool
        try:
            registry = await pool.supervisor.running(pool.registry, HELPER_TIMEOUT)
        except HelperUnavailable as exc:
            raise ResolveError(str(exc)) from exc
        found = ModelMetadata.from_answer(await registry.metadata(uri), version)
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[uri] = found
        return found

    def cached(self, ep: Endpoint) -> ModelMetadata | None:
        """The metadata of the version ``ep``'s runner serves, if fetched already."""
        runner = ep.runner
        return self._cache.get(runner.model_uri) if runner is not None else None

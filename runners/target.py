"""What a model URI points at, and whether it moves when the registry changes."""

from __future__ import annotations

import re
from dataclasses import dataclass

_STAGES = {"none": "None", "staging": "Staging", "production": "Production",
           "archived": "Archived"}
_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))/?$")


@dataclass(frozen=True)
class ModelTarget:
    """A parsed model URI: a registry alias, stage, latest, pinned version, or anything else."""

    uri: str
    name: str | None = None
    alias: str | None = None
    stage: str | None = None  # a stage name, or "latest"
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelTarget:
        match = _MODELS.match(uri)
        if not match:
            return cls(uri=uri)
        name, alias, ref = match["name"], match["alias"], match["ref"]
        if alias is not None:
            return cls(uri=uri, name=name, alias=alias)
        if ref.isdigit():
            return cls(uri=uri, name=name, version=ref)
        if ref.lower() == "latest":
            return cls(uri=uri, name=name, stage="latest")
        return cls(uri=uri, name=name, stage=_STAGES.get(ref.lower(), ref))

    @property
    def in_registry(self) -> bool:
        return self.name is not None

    @property
    def follows(self) -> bool:
        """True for an alias, a stage or latest: targets the registry can move."""
        return self.alias is not None or self.stage is not None

    def pinned(self, version: str | None) -> str:
        return f"models:/{self.name}/{version}" if self.name and version else self.uri

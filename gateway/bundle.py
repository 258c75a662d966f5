"""``model-gateway bundle``: freeze a config's endpoints into a directory that serves with
no registry (scenario I, a local model with local dependencies, e.g. in an air-gapped
container).

Every endpoint is resolved to the version it names now; each version's artifacts are
downloaded once into ``DIR/models/``; ``DIR/gateway.yaml`` is the original config with
each endpoint serving its directory (``env_manager: local``, no tracking URI), and
``DIR/manifest.json`` says what was frozen: name, alias, version, run id, source URIs and
a checksum per model. Environment references (``${…}``) of the original config are kept
as they are, so no secret is written into the bundle.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from runners.target import ModelTarget

from .config import GatewayConfig, load_config

BUNDLE_ENV = "MODEL_GATEWAY_BUNDLE"  # where the bundle is, when it moved (an image)
MODELS = "models"


class BundleError(Exception):
    """A bundle that cannot be made; the message says which endpoint and why."""


def tree_checksum(root: Path) -> str:
    """sha256 over every file's relative path and content, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


class Bundler:
    """Downloads with MLflow's client (imported here, in the CLI process, not the server)."""

    def __init__(self, tracking_uri: str | None, registry_uri: str | None) -> None:
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        self.client = MlflowClient()
        self._fetched: dict[str, tuple[str, dict[str, Any]]] = {}  # pinned URI → dir, info

    def freeze(self, uri: str, out: Path) -> tuple[str, dict[str, Any]]:
        """The bundle directory of ``uri`` (relative to ``out``) and what it holds."""
        import mlflow.artifacts

        from runners.resolver import resolve

        target = ModelTarget.parse(uri)
        local = target.name is None and not re.match(r"^[a-z][a-z0-9+.-]*:", uri)
        if local:  # a local directory: copied as it is
            source = Path(uri).expanduser()
            if not (source / "MLmodel").is_file():
                raise BundleError(f"{uri}: not a model directory (no MLmodel file)")
            pinned, version, run_id, stored = str(source.resolve()), None, None, None
        else:
            resolved = resolve(uri, False)
            pinned, version = resolved["uri"], resolved["version"]
            run_id = stored = None
            if version is not None and target.name is not None:
                mv = self.client.get_model_version(target.name, version)
                run_id, stored = mv.run_id, mv.source
            elif uri.startswith("runs:/"):
                run_id = uri.split("/")[1]
        if pinned in self._fetched:
            return self._fetched[pinned]
        name = _slug(target.name or Path(pinned).name, f"v{version}" if version else "local")
        rel = f"{MODELS}/{name}"
        dest = out / rel
        if dest.exists():  # two sources with one slug: keep both apart
            rel = f"{rel}-{len(self._fetched)}"
            dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local:
            shutil.copytree(pinned, dest)
        else:
            mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(dest))
        files = [p for p in dest.rglob("*") if p.is_file()]
        info = {"version": version, "run_id": run_id, "pinned_uri": pinned,
                "storage_uri": stored, "path": rel, "checksum": tree_checksum(dest),
                "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        self._fetched[pinned] = (rel, info)
        return rel, info


def bundle(config_path: str, out: Path) -> dict[str, Any]:
    """Write the bundle of ``config_path`` into ``out`` (new or empty); its manifest."""
    config = load_config(config_path)  # named errors first, before anything is fetched
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty; bundle into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    try:
        return _write(config_path, config, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made bundle that looks whole
        raise


def _write(config_path: str, config: GatewayConfig, out: Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    frozen = copy.deepcopy(raw)
    for key in ("tracking_uri", "registry_uri", "webhook_secret"):
        frozen.pop(key, None)  # nothing to follow: the versions are frozen
    # Where to listen: as configured, unless the environment says otherwise (the image sets
    # MODEL_GATEWAY_HOST and MODEL_GATEWAY_PORT, as the demo config reads them).
    server = frozen.setdefault("server", {}) or {}
    frozen["server"] = server
    for key, var in (("host", "MODEL_GATEWAY_HOST"), ("port", "MODEL_GATEWAY_PORT")):
        if "${" not in str(server.get(key, "")):
            server[key] = f"${{{var}:-{getattr(config.server, key)}}}"
    bundler = Bundler(config.tracking_uri, config.registry_uri)
    entries = []
    for i, spec in enumerate(config.endpoint_specs()):
        try:
            rel, info = bundler.freeze(spec.model_uri, out)
        except BundleError as exc:
            raise BundleError(f"endpoint {spec.name}/{spec.alias}: {exc}") from None
        except Exception as exc:  # MLflow raises many kinds: name the endpoint, re-raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"endpoint {spec.name}/{spec.alias} ({spec.model_uri}): "
                              f"{first}") from exc
        endpoint = frozen["endpoints"][i]
        endpoint["model_uri"] = f"${{{BUNDLE_ENV}:-{out}}}/{rel}"
        endpoint["env_manager"] = "local"  # scenario I: the bundle's image has the packages
        entries.append({"name": spec.name, "alias": spec.alias, "source_uri": spec.model_uri,
                        **info})
    manifest = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": os.path.basename(config_path),
        "endpoints": entries,
    }
    header = ("# Made by `model-gateway bundle` from " + os.path.basename(config_path) +
              ": every endpoint serves a frozen\n# copy under models/ (manifest.json says "
              f"which version). ${BUNDLE_ENV} points at this\n# directory when it has moved "
              "(the bundle image sets it).\n")
    (out / "gateway.yaml").write_text(header + yaml.safe_dump(frozen, sort_keys=False),
                                      encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest

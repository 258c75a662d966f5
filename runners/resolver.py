"""The resolver process: answers registry questions for the gateway over stdin/stdout.

MLflow's client imports pandas and weighs about 170 MB; keeping it in this helper keeps
the gateway process small and its event loop free of blocking registry calls.
Protocol: one JSON object per line each way; requests carry an ``id`` echoed back.

    {"id": 1, "op": "resolve", "uri": "models:/iris@champion"}
    {"id": 1, "ok": true, "version": "2", "uri": "models:/iris/2", "example": "{...}"}
    {"id": 2, "op": "metadata", "uri": "models:/iris/2"}
    {"id": 2, "ok": true, "uri": "models:/iris/2", "signature": {"inputs": [...], …},
     "example": "{...}", "flavors": ["python_function", "sklearn"]}
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .target import ModelTarget

_write_lock = threading.Lock()


def _example(uri: str) -> str | None:
    """The model's saved serving input example, used to warm up a new runner."""
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/serving_input_example.json")
    except Exception:  # noqa: BLE001 - most models have none; any failure means "no example"
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def resolve(uri: str, with_example: bool) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    target = ModelTarget.parse(uri)
    client = MlflowClient()
    version: str | None = None
    if target.name is None:  # a path or a storage URI: nothing to ask the registry
        pass
    elif target.alias is not None:
        version = str(client.get_model_version_by_alias(target.name, target.alias).version)
    elif target.stage is not None:
        stages = None if target.stage == "latest" else [target.stage]
        found = client.get_latest_versions(target.name, stages=stages)
        if not found:
            raise LookupError(f"registered model {target.name!r} has no version in stage "
                              f"{target.stage!r}")
        version = str(max(int(v.version) for v in found))
    elif target.version is not None:
        version = str(client.get_model_version(target.name, target.version).version)
    pinned = target.pinned(version)
    return {"version": version, "uri": pinned,
            "example": _example(pinned) if with_example else None}


def metadata(uri: str) -> dict[str, Any]:
    """A pinned version's signature (its ``MLmodel``) and serving input example, read from
    the artifact store without loading the model."""
    import mlflow.artifacts
    import yaml

    path = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/MLmodel")
    with open(path, encoding="utf-8") as fh:
        mlmodel = yaml.safe_load(fh) or {}
    signature = mlmodel.get("signature") or {}
    parsed = {key: json.loads(signature[key]) if isinstance(signature.get(key), str) else None
              for key in ("inputs", "outputs", "params")}
    return {"uri": uri, "signature": parsed, "example": _example(uri),
            "flavors": sorted(mlmodel.get("flavors") or {})}


def _answer(req: dict[str, Any]) -> None:
    try:
        if req.get("op") == "metadata":
            out = {"id": req["id"], "ok": True, **metadata(req["uri"])}
        else:
            out = {"id": req["id"], "ok": True, **resolve(req["uri"], bool(req.get("example")))}
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the gateway as text
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        out = {"id": req.get("id"), "ok": False, "error": f"{type(exc).__name__}: {message}"}
    with _write_lock:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def _open_stores() -> None:
    """Open the registry now: the first call builds MLflow's store (for a database, an
    engine and a schema check: about a second), which would otherwise be the first cold
    start's. A registry that does not answer yet is not waited for."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().search_registered_models(max_results=1)
    except Exception:  # noqa: BLE001 - the first resolve reports it, if it persists
        pass


def main() -> int:
    # Fail fast instead of MLflow's minutes of retries: the gateway polls again anyway.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow.tracking  # noqa: F401 - import once, up front, not on the first request

    _open_stores()
    sys.stdout.write(json.dumps({"id": None, "ok": True, "ready": True}) + "\n")
    sys.stdout.flush()
    with ThreadPoolExecutor(max_workers=4) as executor:
        for line in sys.stdin:
            if line.strip():
                executor.submit(_answer, json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``model-gateway bundle``: a config's endpoints frozen into a directory that serves the
same predictions with the registry unreachable, as it is and laid out as the Dockerfile's
``bundle`` target has it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from gateway.bundle import tree_checksum
from tests.conftest import ROOT, free_port, wait_for
from tests.registry import IRIS_COLUMNS, Registry
from tests.test_deploy import (
    _local_argv,
    _local_env,
    _rebase,
    _started,
    dockerfile_stages,
    exec_form,
    image_env,
)

pytestmark = pytest.mark.slow

X = {"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}
IRIS = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[5.1, 3.5, 1.4, 0.2],
                                                              [6.7, 3.0, 5.2, 2.3]]}}
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens; connections are refused


def model_gateway(*args: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "model-gateway"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def predictions(base: str) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=120) as client:
        return {path: client.post(f"/models/{path}/invocations", json=body).json()
                for path, body in (("const/live", X), ("const/pinned", X),
                                   ("iris/local", IRIS))}


@pytest.fixture
def source(tmp_path: Path, registry: Registry) -> Path:
    MlflowClient(registry.tracking_uri).set_registered_model_alias("const", "bundled", "1")
    config = tmp_path / "team.yaml"
    config.write_text(yaml.safe_dump({
        "tracking_uri": registry.tracking_uri,
        "auth": {"admin_tokens": ["${BUNDLE_TEST_ADMIN_TOKEN:-}"]},
        "defaults": {"env_manager": "local"},
        "endpoints": [
            {"name": "const", "alias": "live", "model_uri": "models:/const@bundled"},
            {"name": "const", "alias": "pinned", "model_uri": "models:/const/2"},
            {"name": "const", "alias": "again", "model_uri": "models:/const/2"},
            {"name": "iris", "alias": "local", "model_uri": registry.iris_path}]}))
    return config


def test_a_bundle_serves_its_frozen_versions_with_no_registry(
        tmp_path: Path, registry: Registry, source: Path) -> None:
    out = tmp_path / "bundle"
    done = model_gateway("bundle", "--config", str(source), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "serve it with" in done.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    entries = {(e["name"], e["alias"]): e for e in manifest["endpoints"]}
    client = MlflowClient(registry.tracking_uri)
    live = entries[("const", "live")]
    assert (live["version"], live["source_uri"]) == ("1", "models:/const@bundled")
    assert live["run_id"] == client.get_model_version("const", "1").run_id
    assert entries[("const", "pinned")]["version"] == "2"
    # One version, two endpoints: downloaded once.
    assert entries[("const", "again")]["path"] == entries[("const", "pinned")]["path"]
    assert entries[("iris", "local")]["version"] is None
    for e in entries.values():
        assert e["checksum"] == tree_checksum(out / e["path"])
        assert (out / e["path"] / "MLmodel").is_file()

    text = (out / "gateway.yaml").read_text()
    frozen = yaml.safe_load(text)
    assert "tracking_uri" not in frozen
    assert "${BUNDLE_TEST_ADMIN_TOKEN:-}" in text  # references kept: no secret written
    assert all(ep["env_manager"] == "local" for ep in frozen["endpoints"])
    assert frozen["server"]["port"] == "${MODEL_GATEWAY_PORT:-8080}"  # the image sets it
    assert (model_gateway("check-config", str(out / "gateway.yaml"))).returncode == 0

    # Bundling into it again is refused (it is not empty), with a clear message.
    again = model_gateway("bundle", "--config", str(source), "--out", str(out))
    assert again.returncode == 1 and "not empty" in again.stderr

    # The registry moves on; the bundle does not.
    client.set_registered_model_alias("const", "bundled", "2")
    env = {**_plain_env(), "MLFLOW_TRACKING_URI": UNREACHABLE}
    port = free_port()
    with _started([str(Path(sys.executable).parent / "model-gateway"), "serve", "--config",
                   str(out / "gateway.yaml"), "--port", str(port)],
                  env, tmp_path, tmp_path / "direct.log") as proc:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(base), 30), (tmp_path / "direct.log").read_text()
        got = predictions(base)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert got["const/live"] == {"predictions": [1.0]}  # frozen at version 1
    assert got["const/pinned"] == {"predictions": [2.0]}
    assert len(got["iris/local"]["predictions"]) == 2

    # As the Dockerfile's bundle target lays it out: the directory moved under the image's
    # path, the image's env, entrypoint and command.
    stage = next(s for s in dockerfile_stages() if s.name == "bundle")
    destination = stage.last("COPY").split()[-1]
    image_dir = _rebase(destination, tmp_path)
    shutil.rmtree(image_dir)
    shutil.copytree(out, image_dir)
    shutil.rmtree(out)  # nothing may still point at the old place
    port = free_port()
    assert image_env(stage, {})["MODEL_GATEWAY_CONFIG"] == f"{destination}/gateway.yaml"
    env = _local_env(stage, tmp_path, {"MODEL_GATEWAY_HOST": "127.0.0.1",
                                       "MODEL_GATEWAY_PORT": str(port),
                                       "MODEL_GATEWAY_CONFIG": str(image_dir / "gateway.yaml"),
                                       "MLFLOW_TRACKING_URI": UNREACHABLE})
    assert env["MODEL_GATEWAY_BUNDLE"] == str(image_dir)  # the image's path, rebased here
    argv = _local_argv(exec_form(stage.last("ENTRYPOINT")) + exec_form(stage.last("CMD")))
    log = tmp_path / "image.log"
    with _started(argv, env, _rebase(stage.last("WORKDIR"), tmp_path), log) as proc:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(base), 30), log.read_text()
        assert predictions(base) == got
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()


def test_an_endpoint_that_cannot_be_resolved_is_named(tmp_path: Path, registry: Registry
                                                      ) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "tracking_uri": registry.tracking_uri,
        "endpoints": [{"name": "const", "alias": "live"},
                      {"name": "nosuch", "alias": "champion"}]}))
    done = model_gateway("bundle", "--config", str(config), "--out", str(tmp_path / "b"))
    assert done.returncode == 1
    assert "bundle: endpoint nosuch/champion (models:/nosuch@champion): " in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()  # no half-made bundle left behind


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_GATEWAY_"))}


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False

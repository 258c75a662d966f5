"""Scenario IV through the gateway: env_manager uv, versions with different requirements."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import GatewayProcess, wait_for
from tests.test_environment import GATEWAY_SKLEARN, OTHER_SKLEARN, log_versions

pytestmark = pytest.mark.slow

X = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}


@pytest.fixture(scope="module")
def skver(tmp_path_factory: pytest.TempPathFactory) -> str:
    """v1 and v3 need the gateway's scikit-learn, v2 another, v4 one that does not exist;
    alias live → v1, alias bad → v4."""
    uri = log_versions(tmp_path_factory.mktemp("env-gw-registry"),
                       (GATEWAY_SKLEARN, OTHER_SKLEARN, GATEWAY_SKLEARN, "0.0.0"))
    MlflowClient(uri).set_registered_model_alias("skver", "live", "1")
    MlflowClient(uri).set_registered_model_alias("skver", "bad", "4")
    return uri


@pytest.fixture
def gateway(tmp_path: Path, skver: str) -> Iterator[Any]:
    started: list[GatewayProcess] = []

    def start(cache: Path, alias: str = "live", **endpoint: Any) -> GatewayProcess:
        config = {"tracking_uri": skver, "env_cache_dir": str(cache),
                  "endpoints": [{"name": "skver", "alias": alias, "env_manager": "uv",
                                 "poll_interval": "1s", "drain_timeout": "5s", **endpoint}]}
        gw = GatewayProcess(config, tmp_path)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def envs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith("uv-"))


def test_cutover_between_requirements_has_zero_failed_requests(gateway: Any, skver: str,
                                                               tmp_path: Path) -> None:
    cache = tmp_path / "envs"
    gw = gateway(cache)
    states: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            states.append(gw.status("skver", "live")["state"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first = gw.predict("skver", "live", X)
    finally:
        watching.set()
        watcher.join()
    assert first.status_code == 200, first.text
    assert first.json() == {"predictions": [GATEWAY_SKLEARN]}
    assert "building_env" in states
    assert gw.status("skver", "live")["state"] == "ready"
    assert len(envs(cache)) == 1

    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                resp = http.post(f"{gw.url}/models/skver/live/invocations", json=X)
                answers.append((resp.status_code, resp.json().get("predictions", [resp.text])[0]
                                if resp.status_code == 200 else resp.text))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        MlflowClient(skver).set_registered_model_alias("skver", "live", "2")
        assert wait_for(lambda: any(a[1] == OTHER_SKLEARN for a in answers), 240), gw.log()
        time.sleep(1)
        assert len(envs(cache)) == 2  # v2 built its own environment
        MlflowClient(skver).set_registered_model_alias("skver", "live", "3")
        assert wait_for(lambda: gw.status("skver", "live")["version"] == "3", 120), gw.log()
        time.sleep(1)
    finally:
        stop.set()
        for t in clients:
            t.join(90)
    assert [a for a in answers if a[0] != 200] == []
    assert {a[1] for a in answers} >= {GATEWAY_SKLEARN, OTHER_SKLEARN}
    assert len(envs(cache)) == 2  # v3 needs what v1 needed: nothing rebuilt
    assert gw.status("skver", "live")["pending_state"] is None


def test_unresolvable_requirement_is_a_clear_503(gateway: Any, tmp_path: Path) -> None:
    cache = tmp_path / "envs"
    gw = gateway(cache, alias="bad", startup_timeout="120s")
    began = time.monotonic()
    resp = gw.predict("skver", "bad", X)
    assert time.monotonic() - began < 60
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("retry-after")
    assert "scikit-learn==0.0.0" in resp.text
    status = gw.status("skver", "bad")
    assert status["state"] == "failed"
    assert "unsatisfiable" in status["last_error"]
    assert envs(cache) == []  # nothing half-built left behind


def test_local_model_with_local_or_built_dependencies(gateway: Any, skver: str,
                                                      tmp_path: Path) -> None:
    """Scenarios I and II: a model from a path, served from the gateway's environment or
    from one built for it. The model answers with the scikit-learn it runs under."""
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(
        MlflowClient(skver).get_model_version_download_uri("skver", "2"),
        dst_path=str(tmp_path / "skver-v2"))
    cache = tmp_path / "envs"
    gw = gateway(cache, alias="disk", model_uri=path)
    built = gw.predict("skver", "disk", X)  # II: env_manager uv, the model's own pins
    assert built.status_code == 200, built.text
    assert built.json() == {"predictions": [OTHER_SKLEARN]}
    assert built.headers["x-model-version"] == "-"
    assert len(envs(cache)) == 1
    local = gateway(tmp_path / "unused", alias="disk", model_uri=path, env_manager="local")
    answer = local.predict("skver", "disk", X)  # I: the gateway's own environment
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": [GATEWAY_SKLEARN]}

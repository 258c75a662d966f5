"""Following the registry: a moved alias or stage goes live by blue-green cutover.

Every test moves its own alias of the ``const`` model (v1 predicts 1.0, v2 predicts 2.0,
v3 cannot load), under load from 8 concurrent clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from mlflow import MlflowClient

from tests.conftest import ClientThreads, GatewayProcess, runner_processes, wait_for
from tests.registry import Registry

pytestmark = pytest.mark.slow

X = {"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}
ADMIN = "admin-token-for-tests"


class Load(ClientThreads[tuple[float, int, Any, str, float]]):
    """Clients sending predictions back to back until stopped, recording every answer:
    (answered at, status, prediction or error text, X-Model-Version, sent at)."""

    def __init__(self, gw: GatewayProcess, name: str, alias: str, clients: int = 8) -> None:
        self.url = f"{gw.url}/models/{name}/{alias}/invocations"
        super().__init__(clients)

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            while self.running():
                sent = time.monotonic()
                try:
                    resp = client.post(self.url, json=X)
                    value = resp.json().get("predictions", [None])[0] if resp.status_code == 200 \
                        else resp.text
                    self.answers[i].append((time.monotonic(), resp.status_code, value,
                                            resp.headers.get("x-model-version", ""), sent))
                except httpx.HTTPError as exc:
                    self.answers[i].append((time.monotonic(), 0, repr(exc), "", sent))

    def failures(self) -> list[tuple[float, int, Any, str, float]]:
        return [a for a in self.all if a[1] != 200]

    def saw(self, value: float) -> bool:
        return any(a[2] == value for a in self.all)


def move_alias(registry: Registry, alias: str, version: str) -> None:
    MlflowClient(registry.tracking_uri).set_registered_model_alias("const", alias, version)


def assert_never_flips_back(load: Load) -> None:
    for client in load.answers:
        values = [a[2] for a in client]
        assert 2.0 in values, "this client never saw the new version"
        first_new = values.index(2.0)
        assert set(values[first_new:]) == {2.0}, "an answer flipped back to the old version"
        # The version header names the side that answered.
        assert all(a[3] == ("2" if a[2] == 2.0 else "1") for a in client)


@pytest.fixture
def follower(start_gateway: Any, registry: Registry) -> Iterator[Any]:
    def start(alias: str, **endpoint: Any) -> GatewayProcess:
        move_alias(registry, alias, "1")
        gw = start_gateway([{"name": "const", "alias": alias, "poll_interval": "1s",
                             "drain_timeout": "5s", **endpoint}],
                           auth={"admin_tokens": [ADMIN]})
        first = gw.predict("const", alias, X)
        assert first.status_code == 200 and first.json() == {"predictions": [1.0]}
        return gw
    yield start


def test_alias_move_under_load_has_zero_failed_requests(follower: Any, registry: Registry
                                                        ) -> None:
    gw = follower("t-poll")
    blue = gw.status("const", "t-poll")["runner"]["pid"]
    with Load(gw, "const", "t-poll") as load:
        time.sleep(1)
        move_alias(registry, "t-poll", "2")
        assert wait_for(lambda: load.saw(2.0), 90), gw.log()
        time.sleep(2)
    assert load.failures() == []
    assert len(load.all) > 50
    assert_never_flips_back(load)
    status = gw.status("const", "t-poll")
    assert (status["version"], status["served_uri"]) == ("2", "models:/const/2")
    assert status["pending_version"] is None
    # Blue drains and stops within drain_timeout (5 s) plus a few seconds.
    assert wait_for(lambda: not psutil.pid_exists(blue), 10)
    assert len(runner_processes(gw.owner)) == 1


def test_broken_version_keeps_the_old_one_serving(follower: Any, registry: Registry) -> None:
    gw = follower("t-broken")
    with Load(gw, "const", "t-broken", clients=4) as load:
        move_alias(registry, "t-broken", "3")
        status = wait_for(lambda: (s := gw.status("const", "t-broken"))["failed_version"] == "3"
                          and s, 90)
        time.sleep(1)
    assert status, gw.log()
    assert load.failures() == []
    assert {a[2] for a in load.all} == {1.0}
    assert status["version"] == "1" and status["state"] == "ready"
    assert "cutover to version 3 failed" in status["last_error"]
    # Not retried at full speed: one runner left, the failed green is gone.
    assert wait_for(lambda: len(runner_processes(gw.owner)) == 1, 10)


def test_deleted_alias_keeps_serving_and_is_reported(follower: Any, registry: Registry
                                                      ) -> None:
    gw = follower("t-deleted")
    MlflowClient(registry.tracking_uri).delete_registered_model_alias("const", "t-deleted")
    status = wait_for(lambda: (s := gw.status("const", "t-deleted"))["last_poll_error"] and s, 20)
    assert status and "t-deleted" in status["last_poll_error"]
    assert status["version"] == "1" and status["state"] == "ready"
    assert gw.predict("const", "t-deleted", X).json() == {"predictions": [1.0]}


# Stages are deprecated in MLflow 3, and still followed by users' endpoints.
@pytest.mark.filterwarnings("ignore:``mlflow.tracking.client.MlflowClient.transition_model_"
                            "version_stage`` is deprecated:FutureWarning")
def test_stage_follows_and_admin_reload_forces_it(start_gateway: Any, registry: Registry
                                                  ) -> None:
    client = MlflowClient(registry.tracking_uri)
    client.transition_model_version_stage("const", "1", "Staging", archive_existing_versions=True)
    gw = start_gateway([{"name": "const", "alias": "staging",
                         "model_uri": "models:/const/Staging", "poll_interval": "1h"}],
                       auth={"admin_tokens": [ADMIN]})
    assert gw.predict("const", "staging", X).json() == {"predictions": [1.0]}
    client.transition_model_version_stage("const", "2", "Staging", archive_existing_versions=True)
    # Without a token, with a wrong one: refused; the poll is an hour away.
    assert gw.client.post("/models/const/staging/reload").status_code == 401
    wrong = gw.client.post("/models/const/staging/reload",
                           headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert "nope" not in wrong.text
    assert gw.predict("const", "staging", X).json() == {"predictions": [1.0]}
    done = gw.client.post("/models/const/staging/reload?wait=true",
                          headers={"Authorization": f"Bearer {ADMIN}"})
    assert done.status_code == 200, done.text
    assert done.json()["version"] == "2"
    answer = gw.predict("const", "staging", X)
    assert answer.json() == {"predictions": [2.0]}
    assert answer.headers["x-model-uri"] == "models:/const/2"


def test_reload_route_is_closed_without_admin_tokens(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "const", "alias": "live"}], auth={})
    refused = gw.client.post("/models/const/live/reload",
                             headers={"Authorization": f"Bearer {ADMIN}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_disabled"


def test_pinned_and_path_uris_do_not_follow(start_gateway: Any, registry: Registry) -> None:
    gw = start_gateway([{"name": "const", "alias": "v1", "model_uri": "models:/const/1"},
                        {"name": "iris", "alias": "disk", "model_uri": registry.iris_path}])
    listed = {(e["name"], e["alias"]): e for e in gw.client.get("/models").json()["endpoints"]}
    assert listed[("const", "v1")]["follows_registry"] is False
    assert listed[("iris", "disk")]["follows_registry"] is False
    answer = gw.predict("const", "v1", X)
    assert answer.headers["x-model-version"] == "1"
    assert answer.headers["x-model-uri"] == "models:/const/1"

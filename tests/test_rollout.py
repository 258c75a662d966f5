"""Progressive cutovers that roll themselves back, with real runners under real load.

The ``canary`` model answers ``x + version``: v1 and v4 are good, v2 answers 500 for a
fifth of inputs, v3 is 150 ms slower. Every test moves its own alias of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from mlflow import MlflowClient

from tests.conftest import (
    ADMIN_TOKEN,
    ClientThreads,
    GatewayProcess,
    metric,
    owned_processes,
    runner_processes,
    wait_for,
)
from tests.registry import Registry

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A p95 of 20 answers swings widely on two busy cores: only the slow version (150 ms on
# a few) is meant to cross the latency bound.
FAST = {"steps": [10, 50, 100], "step_time": "2s", "min_requests": 20,
        "max_error_rate": "1%", "max_latency_ratio": 10.0}


class Callers(ClientThreads[tuple[int, int, Any, str, str]]):
    """Clients sending one-row predictions back to back (x = 1, 2, … 10, in turn), each
    with its own ``X-Customer`` header; every answer is kept per client: (status, x,
    prediction or error text, X-Model-Version, X-Model-Alias)."""

    def __init__(self, gw: GatewayProcess, alias: str, clients: int = 8,
                 name: str = "canary") -> None:
        self.url = f"{gw.url}/models/{name}/{alias}/invocations"
        super().__init__(clients)

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60, headers={"X-Customer": f"customer-{i}"}) as client:
            n = 0
            while self.running():
                x = n % 10 + 1
                n += 1
                try:
                    resp = client.post(self.url, json={"dataframe_split": {
                        "columns": ["x"], "data": [[x]]}})
                    value = resp.json()["predictions"][0] if resp.status_code == 200 \
                        else resp.text[:200]
                    self.answers[i].append((resp.status_code, x, value,
                                            resp.headers.get("x-model-version", ""),
                                            resp.headers.get("x-model-alias", "")))
                except httpx.HTTPError as exc:
                    self.answers[i].append((0, x, repr(exc), "", ""))

    def mark(self) -> list[int]:
        return [len(client) for client in self.answers]

    def since(self, mark: list[int]) -> list[tuple[int, int, Any, str, str]]:
        """The answers each client got after ``mark``."""
        return [a for client, n in zip(self.answers, mark, strict=True) for a in client[n:]]

    def failures(self) -> list[tuple[int, int, Any, str, str]]:
        return [a for a in self.all if a[0] != 200]


def move(registry: Registry, alias: str, version: str) -> None:
    MlflowClient(registry.tracking_uri).set_registered_model_alias("canary", alias, version)


@pytest.fixture
def rolling(start_gateway: Any, registry: Registry) -> Iterator[Any]:
    """A gateway serving canary@<alias> at v1, with a rollout of ``rollout`` settings."""
    def start(alias: str, rollout: dict[str, Any], **config: Any) -> GatewayProcess:
        move(registry, alias, "1")
        gw = start_gateway([{"name": "canary", "alias": alias, "poll_interval": "1s",
                             "drain_timeout": "3s", "rollout": rollout}], **config)
        first = gw.predict("canary", alias, {"dataframe_split": {"columns": ["x"],
                                                                 "data": [[1]]}})
        assert first.status_code == 200 and first.json() == {"predictions": [2.0]}
        return gw
    yield start


def test_a_good_version_takes_each_step_then_all_traffic_with_no_failure(
        rolling: Any, registry: Registry) -> None:
    gw = rolling("r-good", FAST)
    blue = gw.status("canary", "r-good")["runner"]["pid"]
    shares: list[float] = []
    with Callers(gw, "r-good") as load:
        time.sleep(0.5)
        move(registry, "r-good", "4")

        def promoted() -> bool:
            status = gw.status("canary", "r-good")
            if status["rollout"] is not None and status["rollout"]["share"] not in shares:
                shares.append(status["rollout"]["share"])
            return status["version"] == "4"
        assert wait_for(promoted, 60, interval=0.05), gw.log()
        time.sleep(0.5)
    assert load.failures() == []
    assert shares == [10, 50, 100], shares
    # Every answer names the version that computed it.
    assert all(value == x + int(version) for _, x, value, version, _ in load.all)
    versions = [a[3] for a in load.all]
    assert versions.count("1") > 20 and versions.count("4") > 20, len(versions)
    status = gw.status("canary", "r-good")
    assert status["rollout"] is None and status["rolled_back"] is None
    assert metric(gw, "model_gateway_cutovers_total", name="canary", alias="r-good",
                  outcome="succeeded") == 1
    assert wait_for(lambda: not psutil.pid_exists(blue), 10), "blue is drained and stopped"
    assert len(runner_processes(gw.owner)) == 1


def test_a_version_failing_a_fifth_is_rolled_back_at_the_first_step(
        rolling: Any, registry: Registry) -> None:
    rollout = {**FAST, "step_time": "30s", "min_requests": 50}
    gw = rolling("r-bad", rollout)
    with Callers(gw, "r-bad") as load:
        time.sleep(0.5)
        move(registry, "r-bad", "2")
        status = wait_for(lambda: (s := gw.status("canary", "r-bad"))["rolled_back"] and s, 60)
        assert status, gw.log()
        green = wait_for(lambda: len(runner_processes(gw.owner)) == 1, 10)
        after = load.mark()
        time.sleep(2.5)  # a few polls: the alias still names v2, which is not tried again
    assert green, "the rolled-back runner is stopped"
    failed = load.failures()
    # The first failure already crosses 1 % of min_requests; the others were in flight.
    assert 1 <= len(failed) <= 50 // 5, failed
    assert all(code == 500 and version == "2" and x % 5 == 0
               for code, x, _, version, _ in failed)
    assert status["version"] == "1" and status["state"] == "ready"
    assert status["rolled_back"]["version"] == "2"
    assert "failed at step 1 (10%)" in status["rolled_back"]["reason"]
    assert {a[3] for a in load.since(after)} == {"1"}, "all traffic is back on v1"
    assert gw.status("canary", "r-bad")["pending_version"] is None
    assert metric(gw, "model_gateway_cutovers_total", name="canary", alias="r-bad",
                  outcome="rolled_back") == 1
    assert "version 2 rolled back" in gw.log_path.read_text()
    print(f"rolled back after {len(failed)} failed requests")

    # An operator retries it (rolled back again), then the alias moves to a good version,
    # which an operator promotes at once.
    assert gw.client.post("/admin/endpoints/canary/r-bad/rollout/promote",
                          headers=ADMIN).status_code == 409
    retried = gw.client.post("/admin/endpoints/canary/r-bad/rollout/retry", headers=ADMIN)
    assert retried.status_code == 202 and retried.json()["rolled_back"] is None
    with Callers(gw, "r-bad", clients=4):
        assert wait_for(lambda: metric(gw, "model_gateway_cutovers_total", name="canary",
                                       alias="r-bad", outcome="rolled_back") == 2, 60)
    move(registry, "r-bad", "4")
    assert wait_for(lambda: (gw.status("canary", "r-bad")["rollout"] or {}).get("version")
                    == "4", 30)
    promoted = gw.client.post("/admin/endpoints/canary/r-bad/rollout/promote", headers=ADMIN)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["version"] == "4" and promoted.json()["rollout"] is None
    assert gw.client.post("/admin/endpoints/canary/r-bad/rollout/nope",
                          headers=ADMIN).status_code == 404


def test_a_slow_version_is_rolled_back_on_its_latency(rolling: Any, registry: Registry
                                                      ) -> None:
    gw = rolling("r-slow", {**FAST, "step_time": "30s", "max_latency_ratio": 2.0})
    with Callers(gw, "r-slow") as load:
        time.sleep(0.5)
        move(registry, "r-slow", "3")
        status = wait_for(lambda: (s := gw.status("canary", "r-slow"))["rolled_back"] and s,
                          60)
    assert status, gw.log()
    assert load.failures() == [], "a slow answer is still an answer"
    assert status["rolled_back"]["version"] == "3"
    assert status["rolled_back"]["reason"].startswith("p95 latency"), status["rolled_back"]
    assert status["version"] == "1"


def test_sticky_callers_stay_on_one_version_and_abort_rolls_back(
        rolling: Any, registry: Registry) -> None:
    gw = rolling("r-sticky", {**FAST, "steps": [50, 100], "step_time": "5m",
                              "sticky": "X-Customer"})
    move(registry, "r-sticky", "4")
    assert wait_for(lambda: (gw.status("canary", "r-sticky")["rollout"] or {}).get("share")
                    == 50, 60), gw.log()
    with Callers(gw, "r-sticky", clients=12) as load:
        time.sleep(3)
    assert load.failures() == []
    per_client = [{a[3] for a in client} for client in load.answers]
    assert all(len(seen) == 1 for seen in per_client), per_client
    assert {v for seen in per_client for v in seen} == {"1", "4"}
    aborted = gw.client.post("/admin/endpoints/canary/r-sticky/rollout/abort", headers=ADMIN)
    assert aborted.status_code == 200
    assert aborted.json()["rolled_back"] == {"version": "4", "reason": "aborted by an operator"}
    assert aborted.json()["version"] == "1"
    with Callers(gw, "r-sticky", clients=4) as load:
        time.sleep(1)
    assert {a[3] for a in load.all} == {"1"}


def test_sigterm_mid_rollout_leaves_no_orphan_and_restarts_from_the_old_version(
        start_gateway: Any, registry: Registry, tmp_path: Path) -> None:
    move(registry, "r-term", "1")
    endpoint = {"name": "canary", "alias": "r-term", "poll_interval": "1s",
                "rollout": {**FAST, "step_time": "5m"}}
    state = tmp_path / "state"
    gw = start_gateway([endpoint], state_dir=str(state))
    assert gw.predict("canary", "r-term", {"inputs": {"x": [1]}}).json() == {"predictions": [2.0]}
    move(registry, "r-term", "4")
    assert wait_for(lambda: (gw.status("canary", "r-term")["rollout"] or {}).get("share")
                    == 10, 60), gw.log()
    assert len(runner_processes(gw.owner)) == 2
    port, owner = gw.port, gw.owner
    assert gw.stop() == 0
    assert owned_processes(owner) == [], "no runner outlives the gateway"

    again = start_gateway([endpoint], state_dir=str(state), port=port)
    first = again.predict("canary", "r-term", {"inputs": {"x": [1]}})
    assert first.json() == {"predictions": [2.0]}, "it starts from the old version"
    assert first.headers["x-model-version"] == "1"
    status = wait_for(lambda: (s := again.status("canary", "r-term"))["rollout"] and s, 30)
    assert status, again.log()
    assert (status["rollout"]["version"], status["rollout"]["step"]) == ("4", 1)
    assert status["version"] == "1"


def test_a_rollback_while_the_other_arm_cuts_over(start_gateway: Any, registry: Registry
                                                  ) -> None:
    move(registry, "r-champion", "1")
    move(registry, "r-challenger", "1")
    gw = start_gateway([
        {"name": "canary", "alias": "r-champion", "poll_interval": "1s"},
        {"name": "canary", "alias": "r-challenger", "poll_interval": "1s",
         "rollout": {**FAST, "step_time": "30s", "min_requests": 30}},
        {"name": "canary", "alias": "r-split", "traffic": {"r-champion": 50,
                                                           "r-challenger": 50}}])
    for arm in ("r-champion", "r-challenger"):  # both serve v1 before the aliases move
        assert gw.predict("canary", arm, {"inputs": {"x": [1]}}).status_code == 200
    with Callers(gw, "r-split") as load:
        time.sleep(1)
        move(registry, "r-challenger", "2")
        move(registry, "r-champion", "4")
        assert wait_for(lambda: gw.status("canary", "r-challenger")["rolled_back"]
                        and gw.status("canary", "r-champion")["version"] == "4", 60), \
            gw.log()
        time.sleep(1)
        tail = load.mark()
        time.sleep(1)
    champion = [a for a in load.all if a[4] == "r-champion"]
    challenger = [a for a in load.all if a[4] == "r-challenger"]
    assert [a for a in champion if a[0] != 200] == [], "the champion's cutover lost nothing"
    assert all(a[3] == "2" and a[1] % 5 == 0 for a in load.failures())
    assert len(load.failures()) <= 30 // 5
    assert {a[3] for a in load.since(tail) if a[4] == "r-challenger"} == {"1"}
    assert {a[3] for a in load.since(tail) if a[4] == "r-champion"} == {"4"}
    assert len(champion) > 50 and len(challenger) > 50

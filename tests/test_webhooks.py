"""Registry webhooks from a real `mlflow server`, signature checks, and registry outages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from mlflow import MlflowClient

from gateway.webhooks import signature
from tests.conftest import ROOT, free_port, metric, wait_for
from tests.registry import Registry
from tests.test_follow import Load, X

pytestmark = pytest.mark.slow

SECRET = "webhook-secret-for-tests"


class MlflowServer:
    """`mlflow server` on a loopback port, over a copy of the test registry."""

    def __init__(self, db: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = db.with_suffix(".log")

    def start(self) -> None:
        with self.log.open("ab") as log:  # the child keeps its own copy of the descriptor
            self._start(log)
        up = wait_for(lambda: self._healthy(), 90, 0.25)
        assert up, self.log.read_text()[-3000:]

    def _start(self, log: BinaryIO) -> None:
        env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
               # MLflow 3.17 reads the second name; the first is what older notes use.
               "_MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
               "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.db}", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[MlflowServer]:
    db = tmp_path_factory.mktemp("server") / "mlflow.db"
    shutil.copy(registry.root / "mlflow.db", db)
    server = MlflowServer(db)
    server.start()
    yield server
    server.stop()


def signed(body: bytes, *, secret: str = SECRET, delivery: str | None = None,
           stamp: float | None = None) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    ts = str(int(stamp if stamp is not None else time.time()))
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery,
            "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": signature(secret, delivery, ts, body)}


def webhook_metric(gw: Any, result: str) -> float:
    for line in gw.client.get("/metrics").text.splitlines():
        if line.startswith(f'model_gateway_webhook_deliveries_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_webhook_signature_timestamp_and_replay_checks(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "const", "alias": "live"}], webhook_secret=SECRET)
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "const", "alias": "live", "version": "2"}}).encode()
    post = lambda headers: gw.client.post("/hooks/mlflow", content=body, headers=headers)  # noqa: E731
    assert post({"Content-Type": "application/json"}).status_code == 401
    wrong = post(signed(body, secret="not-the-secret"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "signature_invalid"
    stale = post(signed(body, stamp=time.time() - 600))
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "timestamp_stale"
    headers = signed(body)
    ok = post(headers)
    assert ok.status_code == 200
    assert ok.json() == {"refreshing": ["const/live"]}
    replay = post(headers)
    assert replay.status_code == 409
    tampered = signed(body)
    assert gw.client.post("/hooks/mlflow", content=body + b" ", headers=tampered).status_code == 401
    assert webhook_metric(gw, "accepted") == 1
    assert webhook_metric(gw, "rejected") == 5
    assert SECRET not in gw.log()


def test_webhooks_are_off_without_a_secret(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "const", "alias": "live"}])
    body = b'{"entity": "model_version_alias", "action": "created", "data": {"name": "const"}}'
    assert gw.client.post("/hooks/mlflow", content=body, headers=signed(body)).status_code == 404


def test_webhook_from_mlflow_server_switches_before_the_poll(
        mlflow_server: MlflowServer, start_gateway: Any) -> None:
    client = MlflowClient(mlflow_server.url)
    client.set_registered_model_alias("const", "hook", "1")
    gw = start_gateway([{"name": "const", "alias": "hook", "poll_interval": "10m",
                         "drain_timeout": "5s"}],
                       tracking_uri=mlflow_server.url, webhook_secret=SECRET)
    assert gw.predict("const", "hook", X).json() == {"predictions": [1.0]}
    hook = client.create_webhook(name=f"gateway-{gw.port}", url=f"{gw.url}/hooks/mlflow",
                                 events=["model_version_alias.created"], secret=SECRET)
    try:
        time.sleep(1.5)  # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL
        with Load(gw, "const", "hook") as load:
            moved = time.monotonic()
            client.set_registered_model_alias("const", "hook", "2")
            assert wait_for(lambda: load.saw(2.0), 90), gw.log()
            switched = min(a[0] for a in load.all if a[2] == 2.0) - moved
            time.sleep(1)
    finally:
        client.delete_webhook(hook.webhook_id)
    assert load.failures() == []
    assert switched < 60, switched  # the next poll was 10 minutes away
    assert webhook_metric(gw, "accepted") >= 1


def test_registry_outage_keeps_serving_and_following_resumes(
        mlflow_server: MlflowServer, start_gateway: Any) -> None:
    client = MlflowClient(mlflow_server.url)
    client.set_registered_model_alias("const", "outage", "1")
    gw = start_gateway([{"name": "const", "alias": "outage", "poll_interval": "1s",
                         "drain_timeout": "5s"}], tracking_uri=mlflow_server.url)
    assert gw.predict("const", "outage", X).json() == {"predictions": [1.0]}
    mlflow_server.stop(signal.SIGKILL)  # the registry goes away without warning
    try:
        with Load(gw, "const", "outage", clients=4) as load:
            status = wait_for(lambda: (s := gw.status("const", "outage"))["poll_failures"] >= 2
                              and s, 30)
            time.sleep(2)  # keep serving through more failed polls
    finally:
        mlflow_server.start()
    assert status, gw.log()
    assert load.failures() == [] and len(load.all) > 10
    assert {a[2] for a in load.all} == {1.0}
    assert status["last_poll_error"] and status["state"] == "ready"
    client.set_registered_model_alias("const", "outage", "2")
    assert wait_for(lambda: gw.predict("const", "outage", X).json() == {"predictions": [2.0]},
                    90), gw.log()
    assert gw.status("const", "outage")["last_poll_error"] is None


def peer_relays(gw: Any, direction: str, result: str) -> float:
    return metric(gw, "model_gateway_peer_relays_total", direction=direction, result=result)


def test_a_webhook_to_one_replica_switches_all_three(
        mlflow_server: MlflowServer, start_gateway: Any) -> None:
    """Three gateways, one registry, polling every 10 minutes: MLflow's webhook reaches
    the first, which relays it; all three serve the new version. With one stopped, the
    other two still switch."""
    client = MlflowClient(mlflow_server.url)
    client.set_registered_model_alias("const", "peers", "1")
    ports = [free_port() for _ in range(3)]
    peers = {"addresses": [f"http://127.0.0.1:{p}" for p in ports]}  # itself too: skipped
    gws = [start_gateway([{"name": "const", "alias": "peers", "poll_interval": "10m",
                           "drain_timeout": "2s"}],
                         tracking_uri=mlflow_server.url, webhook_secret=SECRET, peers=peers,
                         port=port) for port in ports]

    def serving(gw: Any, value: float) -> bool:
        return gw.predict("const", "peers", X).json() == {"predictions": [value]}

    assert all(serving(gw, 1.0) for gw in gws)
    hook = client.create_webhook(name=f"gateway-peers-{ports[0]}",
                                 url=f"{gws[0].url}/hooks/mlflow",
                                 events=["model_version_alias.created"], secret=SECRET)
    try:
        time.sleep(1.5)  # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL
        client.set_registered_model_alias("const", "peers", "2")
        for gw in gws:
            assert wait_for(lambda gw=gw: serving(gw, 2.0), 60), gw.log()
        gws[2].stop()
        client.set_registered_model_alias("const", "peers", "1")
        for gw in gws[:2]:
            assert wait_for(lambda gw=gw: serving(gw, 1.0), 60), gw.log()
    finally:
        client.delete_webhook(hook.webhook_id)
    assert peer_relays(gws[0], "sent", "ok") == 3  # two peers, then one
    assert peer_relays(gws[0], "sent", "failed") == 1  # the stopped one
    assert peer_relays(gws[0], "received", "accepted") == 0  # never to itself
    assert peer_relays(gws[1], "received", "accepted") == 2

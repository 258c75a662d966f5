"""Admin API, config reload (route and SIGHUP) and metrics, on a real gateway."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import yaml

from tests.conftest import metric, runner_processes, wait_for
from tests.test_follow import Load, X

pytestmark = pytest.mark.slow

ADMIN = "admin-token-for-tests"
KEY = "api-key-for-tests"
BEARER = {"Authorization": f"Bearer {ADMIN}"}


def const(alias: str, version: str = "1", **extra: Any) -> dict[str, Any]:
    return {"name": "const", "alias": alias, "model_uri": f"models:/const/{version}", **extra}


def test_admin_routes_need_an_admin_token(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], auth={"admin_tokens": [ADMIN], "api_keys": [KEY]})
    routes = [("GET", "/admin/endpoints"), ("POST", "/admin/endpoints/const/a/reload"),
              ("POST", "/admin/endpoints/const/a/stop"), ("GET", "/admin/endpoints/const/a/logs"),
              ("POST", "/admin/config/reload")]
    for method, path in routes:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"},
                        {"Authorization": ADMIN}]:
            answer = gw.client.request(method, path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert ADMIN not in answer.text and KEY not in answer.text
    assert gw.client.get("/admin/endpoints", headers=BEARER).status_code == 200
    assert ADMIN not in gw.log() and KEY not in gw.log()


def test_admin_routes_are_closed_without_admin_tokens(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], auth={})
    for path in ["/admin/endpoints", "/admin/endpoints/const/a/logs"]:
        answer = gw.client.get(path, headers=BEARER)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_disabled"
    assert gw.client.post("/admin/config/reload", headers=BEARER).status_code == 403


def test_start_logs_stop_and_listing(start_gateway: Any) -> None:
    gw = start_gateway([const("a"), const("b")], auth={"admin_tokens": [ADMIN]})
    started = gw.client.post("/admin/endpoints/const/a/start", headers=BEARER)
    assert started.status_code == 200 and started.json()["state"] == "ready"
    assert len(runner_processes(gw.owner)) == 1
    listing = gw.client.get("/admin/endpoints", headers=BEARER).json()
    assert listing["live_runners"] == 1
    a = next(e for e in listing["endpoints"] if e["alias"] == "a")
    assert a["runner"]["pid"] and a["runner"]["unix_socket"] and a["runner"]["in_flight"] == 0
    logs = gw.client.get("/admin/endpoints/const/a/logs?lines=5", headers=BEARER).json()
    assert 1 <= len(logs["lines"]) <= 5
    assert any("Uvicorn running" in line for line in logs["lines"]) or logs["lines"]
    assert gw.client.get("/admin/endpoints/const/a/logs?lines=x",
                         headers=BEARER).status_code == 400
    assert gw.client.get("/admin/endpoints/const/zzz/logs", headers=BEARER).status_code == 404
    stopped = gw.client.post("/admin/endpoints/const/a/stop", headers=BEARER)
    assert stopped.status_code == 200 and stopped.json()["state"] == "cold"
    assert wait_for(lambda: runner_processes(gw.owner) == [], 10)
    assert gw.predict("const", "a", X).json() == {"predictions": [1.0]}  # starts again


def _rewrite(gw: Any, endpoints: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(gw.config_path.read_text())
    config["endpoints"] = endpoints
    gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_config_reload_adds_removes_and_changes_under_load(start_gateway: Any) -> None:
    gw = start_gateway([const("keep"), const("gone"), const("change")],
                       auth={"admin_tokens": [ADMIN]})
    for alias in ["keep", "gone", "change"]:
        assert gw.predict("const", alias, X).status_code == 200
    with Load(gw, "const", "keep", clients=4) as keep, \
            Load(gw, "const", "change", clients=4) as change:
        time.sleep(1)
        _rewrite(gw, [const("keep"), const("change", "2", drain_timeout="5s"), const("new")])
        answer = gw.client.post("/admin/config/reload", headers=BEARER)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"added": ["const/new"], "removed": ["const/gone"],
                                 "changed": ["const/change"], "failed": {},
                                 "restart_required": [], "relayed_to_peers": False}
        assert wait_for(lambda: change.saw(2.0), 30)
        time.sleep(1)
    assert keep.failures() == [] and len(keep.all) > 20
    assert change.failures() == []  # the changed endpoint moved by blue-green
    assert gw.predict("const", "gone", X).status_code == 404
    assert gw.status("const", "new")["state"] == "cold"
    assert gw.predict("const", "new", X).json() == {"predictions": [1.0]}
    assert wait_for(lambda: len(runner_processes(gw.owner)) == 3, 15)  # keep, change, new


def test_bad_config_on_reload_changes_nothing(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], auth={"admin_tokens": [ADMIN]})
    assert gw.predict("const", "a", X).status_code == 200
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace("models:/const/1", "models:/const/2") +
                              "\nbogus_key: 1\n")
    answer = gw.client.post("/admin/config/reload", headers=BEARER)
    assert answer.status_code == 400
    assert "bogus_key: unknown key" in answer.json()["error"]["errors"]
    gw.proc.send_signal(signal.SIGHUP)  # the same file by signal: refused the same way
    assert wait_for(lambda: "config not reloaded" in gw.log(), 10)
    assert gw.predict("const", "a", X).json() == {"predictions": [1.0]}
    assert gw.proc.poll() is None


def test_sighup_reloads_the_config(start_gateway: Any) -> None:
    gw = start_gateway([const("a")])
    assert gw.predict("const", "b", X).status_code == 404
    _rewrite(gw, [const("a"), const("b", "2")])
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: gw.client.get("/models/const/b").status_code == 200, 10)
    assert gw.predict("const", "b", X).json() == {"predictions": [2.0]}


def test_metrics_move_with_their_events(start_gateway: Any) -> None:
    gw = start_gateway([const("a"), const("b")], pool={"max_runners": 1})
    text = gw.client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert metric(gw, "model_gateway_live_runners") == 0
    assert metric(gw, "model_gateway_runner_state", name="const", alias="a", state="cold") == 1
    assert gw.predict("const", "a", X).status_code == 200
    assert gw.client.post("/models/const/a/invocations", content=b"nope",
                          headers={"Content-Type": "application/json"}).status_code == 400
    assert metric(gw, "model_gateway_requests_total", name="const", alias="a",
                  status_class="2xx") == 1
    assert metric(gw, "model_gateway_requests_total", name="const", alias="a",
                  status_class="4xx") == 1
    assert metric(gw, "model_gateway_request_duration_seconds_count", name="const",
                  alias="a") == 2
    assert metric(gw, "model_gateway_cold_starts_total", name="const", alias="a",
                  outcome="ok") == 1
    assert metric(gw, "model_gateway_cold_start_duration_seconds_count", name="const",
                  alias="a") == 1
    assert metric(gw, "model_gateway_runner_state", name="const", alias="a", state="ready") == 1
    assert metric(gw, "model_gateway_live_runners") == 1
    assert wait_for(lambda: metric(gw, "model_gateway_runner_memory_bytes", name="const",
                                   alias="a", version="1") > 0, 10)
    assert metric(gw, "model_gateway_pool_memory_bytes") > 0
    assert gw.predict("const", "b", X).status_code == 200  # evicts a: max_runners is 1
    assert metric(gw, "model_gateway_evictions_total", name="const", alias="a",
                  reason="capacity") == 1
    assert metric(gw, "model_gateway_requests_in_flight", name="const", alias="b") == 0
    # Health and metrics routes are open and reveal no URIs or paths.
    for path in ["/healthz", "/readyz", "/metrics"]:
        body = gw.client.get(path).text
        assert "models:/" not in body and "sqlite" not in body and "/tmp" not in body

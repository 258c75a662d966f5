"""Endpoints declared at run time (``/admin/deployments``), ``state_dir`` and ``default``:
validated at load, kept across restarts and reloads, never written into the config file."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from gateway.declared import DeclaredEndpoints
from tests.gateway.conftest import ENDPOINTS, serve

TOKEN = "declared-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
AUTH = {"auth": {"admin_tokens": [TOKEN]}}


def test_state_dir_must_be_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"state_dir: '.*file' is not a directory the gat"):
        parse_config(f"state_dir: {afile}\n")
    assert parse_config(f"state_dir: {tmp_path / 'new'}\n").state_dir == str(tmp_path / "new")
    assert parse_config("state_dir: ''\n").state_dir is None


def test_one_default_endpoint_per_model_name() -> None:
    text = """endpoints:
  - {name: iris, alias: a, default: true}
  - {name: iris, alias: b, default: true}
  - {name: wine, alias: a, default: true}
  - {name: wine, alias: b, default: 'maybe'}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.errors == [
        "endpoints[1].default: model iris already has a default endpoint (endpoints[0])",
        "endpoints[3].default: Input should be a valid boolean, unable to interpret input"]
    specs = parse_config("endpoints: [{name: iris, alias: a, default: true}]").endpoint_specs()
    assert not hasattr(specs[0], "default")  # the gateway's key, not the runner pool's


def test_a_bad_state_file_stops_the_gateway_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text(json.dumps({"endpoints": [
        {"name": "ok", "alias": "a", "model_uri": "/m"},
        {"name": "bad", "alias": "b", "model_uri": "/m", "workers": 0}]}))
    with pytest.raises(ConfigError) as err:
        DeclaredEndpoints(str(tmp_path), None)
    assert err.value.source.endswith("endpoints.json")
    assert err.value.errors == ["endpoints[1].workers: must be ≥ 1"]



@pytest.mark.anyio
async def test_declare_change_remove_and_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = {**AUTH, "state_dir": str(state)}
    async with serve(config) as served, httpx.AsyncClient(base_url=served.url) as client:
        config_file = Path(served.gateway.reloader.config_path or "")
        before = config_file.read_text()
        url = "/admin/deployments/tiny/c"
        assert (await client.post(url, json={"model_uri": "/models/tiny-c"})).status_code == 401
        made = await client.post(url, headers=ADMIN, json={
            "model_uri": "/models/tiny-c", "config": {"request_timeout": "5s", "default": True}})
        assert made.status_code == 201, made.text
        assert made.json()["name"] == "tiny" and made.json()["persisted"] is True
        assert served.gateway.v2.defaults == {"tiny": "c"}
        again = await client.post(url, headers=ADMIN, json={"model_uri": "/models/tiny-c"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "endpoint_exists"
        # The config file's endpoints are its own: 409, naming where they are declared.
        for method in ("POST", "PATCH", "DELETE"):
            refused = await client.request(method, "/admin/deployments/tiny/a", headers=ADMIN,
                                           json={"model_uri": "/x"})
            assert refused.status_code == 409, refused.text
            message = refused.json()["error"]["message"]
            assert str(config_file) in message and "endpoints[0]" in message
        bad = await client.patch(url, headers=ADMIN, json={"config": {"workers": 0,
                                                                       "colour": "red"}})
        assert bad.status_code == 400
        assert bad.json()["error"]["errors"] == ["config.workers: must be ≥ 1",
                                                 "config.colour: unknown key"]
        for hostile in (b"{", b"[]", b'{"model_uri": 1, "x": 2}', b"\xff" * 10):
            assert (await client.patch(url, headers=ADMIN, content=hostile)).status_code == 400
        changed = await client.patch(url, headers=ADMIN, json={"config": {"workers": 2}})
        assert changed.status_code == 200, changed.text
        # (Served after the change: a change to a serving endpoint is a blue-green cutover.)
        answer = await client.post("/models/tiny/c/invocations", content=b'{"x": 1}')
        assert answer.status_code == 200 and answer.json()["body"] == '{"x": 1}'
        assert (await client.patch("/admin/deployments/tiny/zz", headers=ADMIN,
                                   json={"config": {}})).status_code == 404
        saved = json.loads((state / "endpoints.json").read_text())["endpoints"]
        assert saved == [{"name": "tiny", "alias": "c", "model_uri": "/models/tiny-c",
                          "workers": 2, "request_timeout": 5.0, "default": True}]
        # A config reload keeps endpoints declared at run time.
        reloaded = await client.post("/admin/config/reload", headers=ADMIN)
        assert reloaded.status_code == 200 and reloaded.json()["removed"] == []
        assert ("tiny", "c") in served.gateway.pool.endpoints
        assert config_file.read_text() == before  # never written into the config file
    async with serve(config) as served, httpx.AsyncClient(base_url=served.url) as client:
        assert ("tiny", "c") in served.gateway.pool.endpoints  # declared again at start
        assert served.gateway.pool.endpoints[("tiny", "c")].spec.workers == 2
        gone = await client.delete("/admin/deployments/tiny/c", headers=ADMIN)
        assert gone.status_code == 200, gone.text
        answer = await client.post("/models/tiny/c/invocations", content=b"{}")
        assert answer.status_code == 404
        assert json.loads((state / "endpoints.json").read_text()) == {"endpoints": []}


@pytest.mark.anyio
async def test_without_state_dir_endpoints_live_in_memory_and_defaults_conflict() -> None:
    endpoints = [{**ENDPOINTS[0], "default": True}, ENDPOINTS[1]]
    async with serve({**AUTH, "endpoints": endpoints}) as served, \
            httpx.AsyncClient(base_url=served.url) as client:
        made = await client.post("/admin/deployments/other/x", headers=ADMIN,
                                 json={"model_uri": "/models/other"})
        assert made.status_code == 201 and made.json()["persisted"] is False
        taken = await client.post("/admin/deployments/tiny/d", headers=ADMIN, json={
            "model_uri": "/models/tiny-d", "config": {"default": True}})
        assert taken.status_code == 409 and "endpoints[0]" in taken.json()["error"]["message"]
        assert ("tiny", "d") not in served.gateway.pool.endpoints

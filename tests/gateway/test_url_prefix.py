"""``server.url_prefix`` (ADSP's url prefix): every route under it, on both HTTP paths."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from tests.conftest import ROOT
from tests.gateway.conftest import serve

pytestmark = pytest.mark.anyio
PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "plain-asgi"])


@PATHS
async def test_every_route_is_served_under_the_prefix_and_nowhere_else(fast: bool) -> None:
    async with serve({"server": {"url_prefix": "/team/gw/"}}, fast=fast) as served, \
            httpx.AsyncClient(base_url=served.url) as client:
        for _ in range(3):  # the first starts the runner; later ones take the direct path
            answer = await client.post("/team/gw/models/tiny/a/invocations", content=b"{}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["body"] == "{}"  # the runner was asked its own /invocations
        assert (await client.get("/team/gw/healthz")).json() == {"status": "ok"}
        assert (await client.get("/team/gw/models")).status_code == 200
        page = await client.get("/team/gw/")
        assert page.status_code == 200 and "status/assets/status.js" in page.text
        assert (await client.get("/team/gw/status/assets/status.js")).status_code == 200
        assert (await client.get("/team/gw/status/data")).status_code == 200
        # The prefix alone: to the page, by path (never from the Host header).
        bare = await client.get("/team/gw", headers={"host": "evil.example"})
        assert bare.status_code == 308 and bare.headers["location"] == "/team/gw/"
        for outside in ("/models/tiny/a/invocations", "/healthz", "/team/gwx/healthz",
                        "/team/models/tiny/a/invocations", "/"):
            answer = await client.request("POST" if "invocations" in outside else "GET",
                                          outside, content=b"{}" if "inv" in outside else None)
            assert answer.status_code == 404, outside
            assert answer.json()["error"]["code"] == "not_found"


def test_a_prefix_must_be_plain_path_segments() -> None:
    config = parse_config("server: {url_prefix: /a/b-c_d.e~/}\nendpoints: []\n")
    assert config.server.url_prefix == "/a/b-c_d.e~"
    for bad in ("a/b", "/a b", "/a/../b%2f", "/a?x=1", "//a"):
        with pytest.raises(ConfigError, match=r"server\.url_prefix"):
            parse_config(f"server: {{url_prefix: '{bad}'}}\nendpoints: []\n")


def test_a_bad_prefix_on_the_command_line_is_a_named_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", "config/gateway.yaml",
         "--anaconda-project-url-prefix", "no slash", "--anaconda-project-no-browser"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "command line: invalid config" in done.stderr
    assert "server.url_prefix" in done.stderr and "Traceback" not in done.stderr

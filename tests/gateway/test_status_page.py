"""The status page's routes and its history (fast tier: tiny runners, over HTTP).

``tests/test_status_page.py`` drives the page itself in a real browser.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.history import SAMPLES, History
from tests.gateway.conftest import serve

pytestmark = pytest.mark.anyio

KEY, OTHER, ADMIN = "key-of-status-tests", "key-of-b", "admin-of-status-tests"
GUARDED: dict[str, Any] = {
    "auth": {"api_keys": [KEY], "admin_tokens": [ADMIN]},
    "endpoints": [{"name": "tiny", "alias": "a", "model_uri": "/models/tiny-a"},
                  {"name": "tiny", "alias": "b", "model_uri": "/models/tiny-b",
                   "api_keys": [OTHER]},
                  {"name": "tiny", "alias": "pub", "model_uri": "/models/tiny-pub",
                   "public": True}]}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def shown(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return sorted(f"{e['name']}/{e['alias']}" for e in answer.json()["endpoints"])


async def test_page_and_assets_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    async with serve() as served, httpx.AsyncClient(base_url=served.url) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            if src == "data:,":
                continue  # no favicon request (it would be a 404 in the console)
            # Relative: under server.url_prefix too. No CDN, nothing off the gateway.
            assert src.startswith("status/assets/"), src
            asset = await client.get("/" + src)
            assert asset.status_code == 200 and asset.content
            # The only absolute URL in an asset is SVG's namespace name, which is not fetched.
            assert set(re.findall(rb"https?://[^\s\"')]+", asset.content)) <= {
                b"http://www.w3.org/2000/svg"}
        missing = await client.get("/status/assets/../app.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await client.get("/status/assets/status.html")).status_code == 404


async def test_without_api_keys_everyone_sees_every_endpoint_without_process_details() -> None:
    async with serve({"auth": {"admin_tokens": [ADMIN]}}) as served, \
            httpx.AsyncClient(base_url=served.url) as client:
        await client.post("/models/tiny/a/invocations", content=b"{}")  # starts a runner
        anyone = await client.get("/status/data")
        assert shown(anyone) == ["tiny/a", "tiny/b"]
        data = anyone.json()
        assert data["role"] == "anyone" and data["token_needed"] is True  # an admin may log in
        a = next(e for e in data["endpoints"] if e["alias"] == "a")
        assert a["state"] == "ready" and a["memory_bytes"] is not None
        assert "runner" not in a and a["last_error"] is None
        assert data["pool"]["live_runners"] == 1 and data["pool"]["max_runners"] >= 1
        admin = (await client.get("/status/data", headers=bearer(ADMIN))).json()
        assert admin["role"] == "admin"
        a = next(e for e in admin["endpoints"] if e["alias"] == "a")
        assert a["runner"]["pid"] > 0  # process details: admins only


async def test_with_api_keys_a_caller_sees_only_what_its_key_may_call() -> None:
    async with serve(GUARDED) as served, httpx.AsyncClient(base_url=served.url) as client:
        assert shown(await client.get("/status/data")) == ["tiny/pub"]
        assert shown(await client.get("/status/data", headers=bearer(KEY))) == [
            "tiny/a", "tiny/pub"]
        assert shown(await client.get("/status/data", headers=bearer(OTHER))) == [
            "tiny/b", "tiny/pub"]
        admin = await client.get("/status/data", headers=bearer(ADMIN))
        assert shown(admin) == ["tiny/a", "tiny/b", "tiny/pub"]
        caller = (await client.get("/status/data", headers=bearer(KEY))).json()
        assert caller["role"] == "caller" and caller["pool"]["series"] == []
        # A caller's events are those of its endpoints only.
        await client.post("/models/tiny/b/invocations", content=b"{}", headers=bearer(OTHER))
        caller = (await client.get("/status/data", headers=bearer(KEY))).json()
        assert [e for e in caller["events"] if e["alias"] == "b"] == []
        assert any(e["alias"] == "b" for e in
                   (await client.get("/status/data", headers=bearer(ADMIN))).json()["events"])


async def test_no_endpoint_visible_is_a_401_asking_for_a_token() -> None:
    config = {**GUARDED, "endpoints": GUARDED["endpoints"][:2]}
    async with serve(config) as served, httpx.AsyncClient(base_url=served.url) as client:
        for headers in ({}, bearer("wrong")):
            answer = await client.get("/status/data", headers=headers)
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "unauthorized"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get("/")).status_code == 200  # the page itself holds no data


async def test_requests_and_events_become_points_and_a_timeline() -> None:
    async with serve() as served, httpx.AsyncClient(base_url=served.url) as client:
        history = served.gateway.history
        for _ in range(10):
            answer = await client.post("/models/tiny/a/invocations", content=b"{}")
            assert answer.status_code == 200
        pool = served.gateway.pool
        runner = pool.endpoints[("tiny", "a")].runner
        assert runner is not None
        await pool.evict(runner, reason="idle")
        history.sample()
        data = (await client.get("/status/data")).json()
        a = next(e for e in data["endpoints"] if e["alias"] == "a")
        _, rate, p50, p99, errors = a["series"][-1]
        assert rate == pytest.approx(10 / history.tick) and errors == 0
        assert 0 < p50 <= p99
        b = next(e for e in data["endpoints"] if e["alias"] == "b")
        assert b["series"][-1][1:] == [0.0, None, None, None]  # no request: a gap, not 0 ms
        assert [e["kind"] for e in data["events"]] == ["start", "eviction"]
        assert data["events"][1]["text"] == "evicted (idle)"
        assert a["state"] == "cold" and a["last_started"] is not None
        pool_point = data["pool"]["series"][-1]
        assert pool_point[3:] == [1, 1, 0]  # one cold start, one eviction, no cutover


def test_history_is_bounded_and_its_quantiles_honest() -> None:
    history = History(tick=1.0, points=3)

    pool = SimpleNamespace(endpoints={("m", "a"): object()}, runners=[], memory=0)
    history.watch(pool)  # type: ignore[arg-type]  # what History reads of a pool
    for i in range(SAMPLES * 4):  # more than a window keeps: a uniform sample of them
        history.observe_request("m", "a", 200 if i % 10 else 503, (i % 100) / 1000)
    history.sample(now=1.0)
    _, rate, p50, p99, errors = history.series[("m", "a")][-1]
    assert rate == SAMPLES * 4 and errors == pytest.approx(0.1, abs=0.001)
    assert 40 <= p50 <= 60 and p99 >= 95
    for t in range(2, 10):
        history.sample(now=float(t))
    assert len(history.series[("m", "a")]) == 3 and len(history.pool_series) == 3
    pool.endpoints = {}  # removed by a reload: its series goes too
    history.sample(now=10.0)
    assert history.series == {}

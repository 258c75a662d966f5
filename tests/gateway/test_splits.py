"""Traffic splits (fast tier: tiny runners, the real gateway over HTTP).

A routing endpoint sends each request to one of its arms; ``X-Model-Alias`` names the
arm that answered.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from gateway.splits import Split
from tests.gateway.conftest import ENDPOINTS, serve

pytestmark = pytest.mark.anyio

ADMIN, KEY, LIVE_KEY = "admin-of-split-tests", "key-of-split-tests", "key-of-live-only"
CONFIG: dict[str, Any] = {
    "auth": {"admin_tokens": [ADMIN], "api_keys": [KEY]},
    "endpoints": [*ENDPOINTS,
                  {"name": "tiny", "alias": "live", "traffic": {"a": 70, "b": 30},
                   "api_keys": [LIVE_KEY]},
                  {"name": "tiny", "alias": "sticky", "traffic": {"a": 50, "b": 50},
                   "sticky": "X-Customer-Id"}]}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def _arms(client: httpx.AsyncClient, path: str, count: int, *, concurrency: int = 32,
                headers: Any = None) -> collections.Counter[str]:
    """Send ``count`` predictions; how many each arm answered (X-Model-Alias)."""
    seen: collections.Counter[str] = collections.Counter()
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            extra = headers(i) if callable(headers) else (headers or {})
            answer = await client.post(path, content=b"{}", headers=extra)
            assert answer.status_code == 200, answer.text
            seen[answer.headers["x-model-alias"]] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


async def test_shares_follow_the_weights_and_answers_name_their_arm() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        seen = await _arms(client, "/models/tiny/live/invocations", 500,
                           headers=bearer(LIVE_KEY))
        assert sum(seen.values()) == 500
        assert abs(seen["a"] / 500 - 0.70) <= 0.02 and abs(seen["b"] / 500 - 0.30) <= 0.02
        status = (await client.get("/models/tiny/live", headers=bearer(LIVE_KEY))).json()
        assert status["routing"] is True and status["traffic"] == {"a": 70.0, "b": 30.0}
        arms = {arm["arm"]: arm for arm in status["arms"]}
        assert arms["a"]["requests"] == seen["a"] and arms["a"]["state"] == "ready"
        assert arms["b"]["share"] == round(seen["b"] / 500, 4)
        metrics = (await client.get("/metrics")).text
        assert f'model_gateway_split_requests_total{{alias="live",arm="tiny/a",name="tiny"}} ' \
               f'{float(seen["a"])}' in metrics
        # Arms count their own requests, as any endpoint.
        assert 'model_gateway_requests_total{alias="a",name="tiny",status_class="2xx"}' \
            in metrics


async def test_the_routing_endpoints_keys_apply_not_its_arms() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        live = "/models/tiny/live/invocations"
        assert (await client.post(live, content=b"{}")).status_code == 401
        assert (await client.post(live, content=b"{}", headers=bearer(KEY))).status_code == 401
        assert (await client.post("/models/tiny/a/invocations", content=b"{}",
                                  headers=bearer(LIVE_KEY))).status_code == 401
        ok = await client.post(live, content=b"{}", headers=bearer(LIVE_KEY))
        assert ok.status_code == 200 and ok.headers["x-model-alias"] in ("a", "b")
        listed = (await client.get("/models", headers=bearer(LIVE_KEY))).json()["endpoints"]
        assert [e["alias"] for e in listed] == ["live"]


async def test_a_sticky_header_value_always_reaches_the_same_arm() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        per_customer: dict[str, set[str]] = collections.defaultdict(set)

        async def one(i: int) -> None:
            customer = f"customer-{i % 200}"
            answer = await client.post("/models/tiny/sticky/invocations", content=b"{}",
                                       headers={**bearer(KEY), "X-Customer-Id": customer})
            assert answer.status_code == 200
            per_customer[customer].add(answer.headers["x-model-alias"])

        for start in range(0, 400, 50):
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))
        assert all(len(arms) == 1 for arms in per_customer.values())
        firsts = collections.Counter(next(iter(arms)) for arms in per_customer.values())
        assert firsts["a"] > 30 and firsts["b"] > 30  # both arms get customers
        # The same value maps to the same arm in any process (replicas agree).
        split = Split.build(("tiny", "sticky"), {"a": 50, "b": 50}, "X-Customer-Id")
        assert all(split.pick([(b"x-customer-id", c.encode())]) == ("tiny", next(iter(a)))
                   for c, a in per_customer.items())


async def test_weights_change_at_once_under_load() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        path, headers = "/models/tiny/live/invocations", bearer(LIVE_KEY)
        load = asyncio.create_task(_arms(client, path, 600, concurrency=16, headers=headers))
        await asyncio.sleep(0.05)
        put = await client.put("/admin/endpoints/tiny/live/traffic",
                               json={"traffic": {"a": 0, "b": 1}}, headers=bearer(ADMIN))
        assert put.status_code == 200, put.text
        assert put.json()["traffic"] == {"a": 0.0, "b": 1.0}
        seen_during = await load  # every request answered 200 across the change
        assert seen_during["a"] > 0 and sum(seen_during.values()) == 600
        after = await _arms(client, path, 100, headers=headers)
        assert after == {"b": 100}


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"a": 1, "nope": 1}, 400, "nope: no endpoint tiny/nope is declared"),
    ({"a": -1}, 400, "a: a weight must be a number ≥ 0"),
    ({"a": 0, "b": 0}, 400, "weights must sum to a positive number"),
    ({"sticky": 1}, 400, "sticky: tiny/sticky routes traffic itself"),
    ("not an object", 400, "expected a JSON object of weights"),
])
async def test_bad_weights_change_nothing(body: Any, status: int, words: str) -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        put = await client.put("/admin/endpoints/tiny/live/traffic", json=body,
                               headers=bearer(ADMIN))
        assert put.status_code == status and words in put.json()["error"]["message"]
        status_now = (await client.get("/models/tiny/live", headers=bearer(LIVE_KEY))).json()
        assert status_now["traffic"] == {"a": 70.0, "b": 30.0}


async def test_weights_route_needs_an_admin_and_a_routing_endpoint() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        route = "/admin/endpoints/tiny/live/traffic"
        assert (await client.put(route, json={"a": 1})).status_code == 401
        assert (await client.put(route, json={"a": 1}, headers=bearer(KEY))).status_code == 401
        model = await client.put("/admin/endpoints/tiny/a/traffic", json={"a": 1},
                                 headers=bearer(ADMIN))
        assert model.status_code == 409 and model.json()["error"]["code"] == "not_routing"
        missing = await client.put("/admin/endpoints/tiny/zzz/traffic", json={"a": 1},
                                   headers=bearer(ADMIN))
        assert missing.status_code == 404


@pytest.mark.parametrize(("endpoint", "error"), [
    ({"name": "m", "alias": "r", "traffic": {"a": 1}, "model_uri": "/x"},
     "endpoints[2].model_uri: a routing endpoint (traffic) has no model of its own"),
    ({"name": "m", "alias": "r", "traffic": {"a": 1}, "workers": 2},
     "endpoints[2].workers: a routing endpoint (traffic) has no runner"),
    ({"name": "m", "alias": "r", "traffic": {"a": 0, "b": 0}},
     "endpoints[2].traffic: weights must sum to a positive number"),
    ({"name": "m", "alias": "r", "traffic": {"a": 1, "c": 1}},
     "endpoints[2].traffic.c: no endpoint m/c is declared"),
    ({"name": "m", "alias": "r", "traffic": {"r": 1}},
     "endpoints[2].traffic.r: m/r routes traffic itself"),
    ({"name": "m", "alias": "r", "traffic": {"other/x": 1}},
     "endpoints[2].traffic.other/x: no endpoint other/x is declared"),
    ({"name": "m", "alias": "r", "traffic": {"a": "lots"}},
     "endpoints[2].traffic.a: a weight must be a number ≥ 0"),
    ({"name": "m", "alias": "r", "model_uri": "/x", "sticky": "X-Id"},
     "endpoints[2].sticky: only a routing endpoint (with traffic) is sticky"),
    ({"name": "m", "alias": "r", "traffic": {"a": 1}, "sticky": "bad header"},
     "endpoints[2].sticky"),
])
def test_bad_routing_config_is_refused_with_its_key_path(endpoint: dict[str, Any],
                                                         error: str) -> None:
    import yaml

    text = yaml.safe_dump({"endpoints": [{"name": "m", "alias": "a", "model_uri": "/a"},
                                         {"name": "m", "alias": "b", "model_uri": "/b"},
                                         endpoint]})
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert error in str(caught.value)


@pytest.mark.parametrize("weights", [{"a": 90, "b": 10}, {"a": 1, "b": 1, "c": 1},
                                     {"a": 0.5, "b": 99.5}, {"a": 3, "b": 0, "c": 7}])
def test_over_5000_requests_shares_are_within_a_fraction_of_a_point(
        weights: dict[str, float]) -> None:
    split = Split.build(("m", "r"), weights, None)
    seen = collections.Counter(split.pick([])[1] for _ in range(5000))
    total = sum(weights.values())
    for arm, weight in weights.items():
        assert abs(seen[arm] / 5000 - weight / total) < 0.002, (arm, seen)


def test_arms_of_another_name_and_zero_weights() -> None:
    config = parse_config("""
endpoints:
  - {name: m, alias: a, model_uri: /a}
  - {name: n, alias: b, model_uri: /b}
  - {name: m, alias: r, traffic: {a: 0, n/b: 3}}
""")
    assert [s.key for s in config.endpoint_specs()] == [("m", "a"), ("n", "b")]
    split = Split.build(("m", "r"), {"a": 0, "n/b": 3}, None)
    assert {split.pick([]) for _ in range(200)} == {("n", "b")}
    assert split.weights() == {"a": 0.0, "n/b": 3.0}

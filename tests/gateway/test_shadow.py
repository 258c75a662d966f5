"""Shadow traffic (fast tier: tiny runners that answer predictions, over HTTP).

Tiny runners named ``predict…`` answer ``{"inputs": rows}`` with the sum of each row
(plus an offset, after a sleep, or a 500: ``tests/tiny_runner.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from gateway.shadow import compare
from tests.gateway.conftest import serve

pytestmark = pytest.mark.anyio

ADMIN = "admin-of-shadow-tests"
BODY = b'{"inputs": [[1.0, 2.0], [3.0, 4.5]]}'


def _config(shadow: dict[str, Any], shadow_model: str) -> dict[str, Any]:
    return {"auth": {"admin_tokens": [ADMIN]}, "endpoints": [
        {"name": "m", "alias": "primary", "model_uri": "/models/predict", "shadow": shadow},
        {"name": "m", "alias": "shadow", "model_uri": f"/models/{shadow_model}"}]}


async def _status(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/admin/endpoints", headers={"authorization": f"Bearer {ADMIN}"})
    return next(e for e in answer.json()["endpoints"] if e["alias"] == "primary")["shadow"]


async def _send(client: httpx.AsyncClient, count: int) -> list[float]:
    """``count`` predictions to the primary, 8 at a time; each one's seconds."""
    took: list[float] = []

    async def one() -> None:
        started = time.perf_counter()
        answer = await client.post("/models/m/primary/invocations", content=BODY,
                                   headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"predictions": [3.0, 7.5]}
        assert answer.headers["x-model-alias"] == "primary"
        took.append(time.perf_counter() - started)

    for _ in range(count // 8):
        await asyncio.gather(*(one() for _ in range(8)))
    return took


def _total(stats: dict[str, Any]) -> int:
    return sum(stats[k] for k in ("match", "mismatch", "error", "dropped"))


async def _settled(client: httpx.AsyncClient, total: int) -> dict[str, Any]:
    """The shadow's tallies once at least ``total`` copies are done and no more come."""
    last: dict[str, Any] = {}
    for _ in range(200):
        stats = await _status(client)
        if _total(stats) >= total and stats == last:
            return stats
        last = stats
        await asyncio.sleep(0.05)
    return last


@pytest.mark.parametrize(("model", "tolerance", "outcome"), [
    ("predict", 1e-6, "match"),
    ("predict-plus0.0000001", 1e-6, "match"),  # within tolerance
    ("predict-plus0.5", 1e-6, "mismatch"),
    ("predict-fail", 1e-6, "error"),  # the shadow answers 500: never seen by callers
])
async def test_a_share_is_compared_and_callers_never_see_the_shadow(
        model: str, tolerance: float, outcome: str) -> None:
    config = _config({"to": "shadow", "percent": "25%", "tolerance": tolerance}, model)
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        await _send(client, 200)
        stats = await _settled(client, 49)
        sent = _total(stats)
        assert abs(sent - 50) <= 1 and stats[outcome] == sent  # 25 % of 200
        assert stats["percent"] == 25.0
        assert stats["agreement"] == {"match": 1.0, "mismatch": 0.0}.get(outcome)
        metrics = (await client.get("/metrics")).text
        assert f'model_gateway_shadow_requests_total{{alias="primary",name="m",' \
               f'outcome="{outcome}"}} {float(sent)}' in metrics
        assert f'model_gateway_shadow_duration_seconds_count{{alias="primary",name="m"}} ' \
               f'{float(sent)}' in metrics


async def test_a_slow_shadow_drops_copies_and_costs_the_caller_nothing() -> None:
    config = _config({"to": "shadow"}, "predict-sleep2")  # percent: 100 by default
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        took = await _send(client, 240)
        assert max(took) < 1.5  # no caller waited for the shadow's two seconds
        stats = await _status(client)
        assert stats["dropped"] >= 240 - 64 - 2  # the queue holds 64; one in flight
        assert stats["error"] == 0


async def test_a_shadow_that_cannot_start_is_counted_as_errors_only() -> None:
    config = {"endpoints": [
        {"name": "m", "alias": "primary", "model_uri": "/models/predict",
         "shadow": {"to": "ghost/x"}},
        {"name": "ghost", "alias": "x", "model_uri": "/models/predict",
         "startup_timeout": "1s", "launcher": "direct"}],  # no such runner script here
        "auth": {"admin_tokens": [ADMIN]}}
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        await _send(client, 16)
        stats = await _settled(client, 16)
        assert stats["error"] + stats["dropped"] == 16 and stats["match"] == 0
        assert stats["error"] >= 1


def test_compare() -> None:
    ok = b'{"predictions": [1.0, {"a": [2.0, "x", true]}]}'
    assert compare(200, ok, 200, ok, 0) == "match"
    assert compare(200, ok, 200, b'{"predictions": [1.0000001, {"a": [2.0, "x", true]}]}',
                   1e-6) == "match"
    assert compare(200, ok, 200, b'{"predictions": [1.0, {"a": [2.0, "y", true]}]}',
                   1e-6) == "mismatch"
    assert compare(200, ok, 200, b'{"predictions": [1.0, {"a": [2.0, "x", 1]}]}',
                   1e-6) == "mismatch"  # a boolean is not a number
    assert compare(200, b'{"predictions": [NaN]}', 200, b'{"predictions": [NaN]}', 0) == \
        "match"
    assert compare(200, ok, 400, b"{}", 1e-6) == "mismatch"
    assert compare(400, b"{}", 400, b"{}", 1e-6) == "match"  # both refuse the input
    assert compare(200, ok, 503, b"{}", 1e-6) == "error"
    assert compare(200, ok, 200, b"[" * 100_000, 1e-6) == "mismatch"


@pytest.mark.parametrize(("shadow", "error"), [
    ({"to": "primary"}, "endpoints[0].shadow.to: an endpoint cannot shadow itself"),
    ({"to": "nope"}, "endpoints[0].shadow.to: no endpoint m/nope is declared"),
    ({"to": "live"}, "endpoints[0].shadow.to: m/live routes traffic"),
    ({"to": "shadow", "percent": 101}, "endpoints[0].shadow.percent"),
    ({"to": "shadow", "tolerance": -1}, "endpoints[0].shadow.tolerance"),
    ({"percent": 5}, "endpoints[0].shadow.to: required"),
])
def test_bad_shadow_config_is_refused_with_its_key_path(shadow: dict[str, Any],
                                                        error: str) -> None:
    import yaml

    text = yaml.safe_dump({"endpoints": [
        {"name": "m", "alias": "primary", "model_uri": "/a", "shadow": shadow},
        {"name": "m", "alias": "shadow", "model_uri": "/b"},
        {"name": "m", "alias": "live", "traffic": {"shadow": 1}}]})
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert error in str(caught.value)

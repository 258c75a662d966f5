"""The gateway's HTTP edge over real sockets, on the fast path and on the plain ASGI path.

Runners are tiny HTTP servers (``tests/tiny_runner.py``), so these run in seconds; the
same behaviours against MLflow runners are in ``tests/test_gateway.py``.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from gateway.protocol import fast_path_problems
from gateway.wire import STATUS_LINE
from tests.conftest import split_answers
from tests.gateway.conftest import Served, serve

pytestmark = pytest.mark.anyio
PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "plain-asgi"])


async def warm(served: Served, alias: str = "a") -> None:
    async with httpx.AsyncClient(base_url=served.url) as client:
        assert (await client.get(f"/models/tiny/{alias}/ping")).status_code == 200


def test_the_installed_uvicorn_passes_the_fast_path_self_check() -> None:
    assert fast_path_problems() == []


def test_the_self_check_can_be_forced_to_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_GATEWAY_FAST_PATH", "off")
    assert fast_path_problems() == ["turned off by MODEL_GATEWAY_FAST_PATH"]


@PATHS
async def test_a_prediction_with_its_headers(fast: bool) -> None:
    async with serve(fast=fast) as served, httpx.AsyncClient(base_url=served.url) as client:
        answer = await client.post("/models/tiny/a/invocations?x=1", content=b'{"inputs": [1]}',
                                   headers={"content-type": "application/json",
                                            "x-request-id": "abc", "authorization": "Bearer k",
                                            "x-forwarded-for": "10.1.1.1"})
        assert answer.status_code == 200
        assert answer.headers["x-model-version"] == "-"  # a path has no registry version
        assert answer.headers["x-model-uri"] == "/models/tiny-a"
        assert answer.headers["x-request-id"] == "abc"
        assert answer.headers["content-type"] == "application/json"
        echo = answer.json()
        assert echo["body"] == '{"inputs": [1]}'
        sent = echo["headers"]
        assert sent["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
        assert sent["x-request-id"] == "abc" and "authorization" not in sent
        assert sent["content-length"] == "15" and sent["host"] == "127.0.0.1"
        generated = await client.get("/models/tiny/a/ping")
        assert len(generated.headers["x-request-id"]) == 32


@PATHS
async def test_pipelined_requests_are_answered_in_order(fast: bool) -> None:
    async with serve(fast=fast) as served:
        await warm(served)
        sent = [b"GET /models/tiny/a/ping HTTP/1.1\r\nhost: t\r\nx-request-id: one\r\n\r\n",
                b"POST /models/tiny/a/invocations HTTP/1.1\r\nhost: t\r\nx-request-id: two\r\n"
                b"content-length: 2\r\n\r\n{}",
                b"HEAD /models/tiny/a/health HTTP/1.1\r\nhost: t\r\nx-request-id: three\r\n\r\n",
                b"GET /models/tiny/a/version HTTP/1.1\r\nhost: t\r\nx-request-id: four\r\n"
                b"connection: close\r\n\r\n"]
        got = split_answers(await served.raw(b"".join(sent)), ["GET", "POST", "HEAD", "GET"])
    assert [a[0] for a in got] == [200, 200, 200, 200]
    assert [a[1]["x-request-id"] for a in got] == ["one", "two", "three", "four"]
    assert json.loads(got[1][2])["body"] == "{}"
    assert got[2][2] == b"" and got[3][2] == b"1.0"
    assert got[3][1]["connection"] == "close"


@PATHS
async def test_http_1_0_is_answered_and_closed(fast: bool) -> None:
    async with serve(fast=fast) as served:
        await warm(served)
        (status, headers, body), = split_answers(
            await served.raw(b"GET /models/tiny/a/ping HTTP/1.0\r\n\r\n"), ["GET"])
    # raw() returned: the gateway closed the connection. (uvicorn before 0.53 leaves
    # out the header on HTTP/1.0, which HTTP/1.0 does not need.)
    assert status == 200 and headers.get("connection", "close") == "close" and body == b"\n"


@PATHS
async def test_answers_of_every_framing_and_size(fast: bool) -> None:
    async with serve(fast=fast) as served, httpx.AsyncClient(base_url=served.url) as client:
        await warm(served)
        for query, size in [("size=10", 10), ("size=600000", 600000), ("chunked=1&size=5000",
                            5000), ("chunked=1&size=300000", 300000), ("close=1&size=1000",
                            1000)]:
            answer = await client.post(f"/models/tiny/a/invocations?{query}", content=b"{}")
            assert answer.status_code == 200, query
            assert answer.content == b"x" * size, query
            assert answer.headers["x-model-uri"] == "/models/tiny-a"


@PATHS
async def test_a_runner_status_passes_through(fast: bool) -> None:
    async with serve(fast=fast) as served, httpx.AsyncClient(base_url=served.url) as client:
        await warm(served)
        for status in (400, 415, 500, 503):
            answer = await client.post(f"/models/tiny/a/invocations?status={status}",
                                       content=b"{}")
            assert answer.status_code == status
        odd = await client.post("/models/tiny/a/invocations?status=299", content=b"{}")
        assert odd.status_code == 299  # not in http.HTTPStatus: the ASGI path writes it
    assert 299 not in STATUS_LINE


@PATHS
async def test_runner_failures_are_json_errors(fast: bool) -> None:
    config = {"defaults": {"request_timeout": "1s"}}
    async with serve(config, fast=fast) as served, \
            httpx.AsyncClient(base_url=served.url) as client:
        await warm(served)
        slow = await client.post("/models/tiny/a/invocations?sleep=3", content=b"{}")
        assert slow.status_code == 504
        assert slow.json()["error"]["code"] == "runner_timeout"
        crash = await client.post("/models/tiny/a/invocations?crash=1", content=b"{}")
        assert crash.status_code == 502
        assert crash.json()["error"]["code"] == "runner_unreachable"
        ep = served.gateway.pool.endpoints[("tiny", "a")]
        async with asyncio.timeout(5):  # the exit is noticed at once, not at a health check
            while ep.runner is not None:
                await asyncio.sleep(0.01)
        assert ep.state.value == "failed" and "exited with code 3" in (ep.last_error or "")
        again = await client.post("/models/tiny/a/invocations", content=b"{}")
        assert again.status_code == 200  # a new runner started for it
        missing = await client.get("/models/tiny/nope/ping")
        assert missing.status_code == 404 and "nope" not in missing.text
        wrong = await client.get("/models/tiny/a/invocations")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


@PATHS
async def test_a_caller_leaving_mid_request_frees_the_runner(fast: bool) -> None:
    async with serve(fast=fast) as served:
        await warm(served)
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"POST /models/tiny/a/invocations?sleep=0.5 HTTP/1.1\r\nhost: t\r\n"
                     b"content-length: 2\r\n\r\n{}")
        await writer.drain()
        ep = served.gateway.pool.endpoints[("tiny", "a")]
        assert ep.runner is not None
        async with asyncio.timeout(5):
            while ep.runner.in_flight != 1:
                await asyncio.sleep(0.01)
        writer.close()
        async with asyncio.timeout(5):
            while ep.runner.in_flight != 0:
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=served.url) as client:
            assert (await client.post("/models/tiny/a/invocations", content=b"{}")
                    ).status_code == 200


@PATHS
async def test_max_concurrency_queues_then_answers_503(fast: bool) -> None:
    config = {"defaults": {"max_concurrency": 1}, "pool": {"queue_timeout": "0.5s"}}
    async with serve(config, fast=fast) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        await warm(served)
        slow = asyncio.create_task(client.post("/models/tiny/a/invocations?sleep=1.5",
                                               content=b"{}"))
        await asyncio.sleep(0.2)
        busy = await client.post("/models/tiny/a/invocations", content=b"{}")
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "pool_busy"
        assert busy.headers["retry-after"] == "1"
        assert (await slow).status_code == 200


def test_the_uvicorn_under_test() -> None:
    """scripts/test runs this module again with the oldest uvicorn pyproject claims."""
    import uvicorn

    expected = os.environ.get("EXPECTED_UVICORN")
    if expected is not None:
        assert uvicorn.__version__ == expected
    assert fast_path_problems() == []

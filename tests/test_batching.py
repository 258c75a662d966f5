"""Adaptive batching end to end: real registry, real runners, the gateway over HTTP.

Every answer of a batching endpoint is checked against the answer the same body gets
from an endpoint of the same model that does not batch: status, Content-Type and body,
byte for byte.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProcess, metric, wait_for
from tests.registry import IRIS_COLUMNS, Registry
from tests.test_follow import Load, X, move_alias

pytestmark = pytest.mark.slow

WAIT = {"max_batch_size": 16, "max_wait": "40ms"}  # batches form even at low concurrency


@pytest.fixture(scope="module")
def gw(registry: Registry, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[GatewayProcess]:
    """Batching and plain endpoints of the same models."""
    config = {"tracking_uri": registry.tracking_uri,
              "defaults": {"startup_timeout": "2m"},
              "endpoints": [{"preload": True, **ep} for ep in [
                  {"name": "iris", "alias": "champion"},  # the reference: no batching
                  {"name": "iris", "alias": "batched", "model_uri": "models:/iris@champion",
                   "batching": {"max_batch_size": 64}},
                  {"name": "iris", "alias": "waits", "model_uri": "models:/iris@champion",
                   "batching": WAIT},
                  # Two uvicorn workers, two call slots; the direct launcher.
                  {"name": "iris", "alias": "workers", "model_uri": "models:/iris@champion",
                   "launcher": "direct", "workers": 2, "batching": {"max_batch_size": 64}},
                  {"name": "rowcount", "alias": "main"},
                  {"name": "rowcount", "alias": "waits", "model_uri": "models:/rowcount@main",
                   "batching": WAIT},
              ]]}
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("batching"))
    assert wait_for(lambda: gateway.client.get("/readyz").status_code == 200, 120), \
        gateway.log()
    yield gateway
    log = gateway.log()
    assert gateway.stop() == 0, log


def _bodies(rng: random.Random) -> tuple[str, bytes]:
    """A random prediction request for iris, in one of the formats that may merge."""
    rows = [[round(rng.uniform(0, 8), rng.choice([1, 2, 3])) for _ in IRIS_COLUMNS]
            for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    kind = rng.choice(["split", "split", "records", "inputs", "instances", "csv"])
    if kind == "csv":
        lines = [",".join(IRIS_COLUMNS), *(",".join(map(str, r)) for r in rows)]
        return "text/csv", ("\n".join(lines) + "\n").encode()
    if kind == "split":
        doc: Any = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": rows}}
    elif kind == "records":
        doc = {"dataframe_records": [dict(zip(IRIS_COLUMNS, r, strict=True)) for r in rows]}
    elif kind == "inputs":
        doc = {"inputs": {c: [r[i] for r in rows] for i, c in enumerate(IRIS_COLUMNS)}}
    else:
        doc = {"instances": [dict(zip(IRIS_COLUMNS, r, strict=True)) for r in rows]}
    return "application/json", json.dumps(doc).encode()


def _post(client: httpx.Client, url: str, content_type: str, body: bytes
          ) -> tuple[int, str, bytes]:
    resp = client.post(url, content=body, headers={"Content-Type": content_type})
    return resp.status_code, resp.headers["content-type"], resp.content


def _together(gw: GatewayProcess, alias: str, requests: list[tuple[str, bytes]],
              model: str = "iris") -> list[tuple[int, str, bytes]]:
    """Send ``requests`` at once (one connection each) to the batching endpoint."""
    url = f"{gw.url}/models/{model}/{alias}/invocations"
    start = threading.Barrier(len(requests))

    def one(request: tuple[str, bytes]) -> tuple[int, str, bytes]:
        with httpx.Client(timeout=60) as client:
            start.wait()
            return _post(client, url, *request)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def _alone(gw: GatewayProcess, requests: list[tuple[str, bytes]], model: str = "iris",
           alias: str = "champion") -> list[tuple[int, str, bytes]]:
    url = f"{gw.url}/models/{model}/{alias}/invocations"
    return [_post(gw.client, url, *request) for request in requests]


def _clients_at_once(gw: GatewayProcess, alias: str, clients: int, each: int) -> None:
    """Randomised rows and formats from many clients at once: each answer is the one the
    same body gets alone (from iris/champion), and many were answered from merged calls."""
    rng = random.Random(15)
    batched_before = metric(gw, "model_gateway_batched_requests_total", name="iris",
                            alias=alias)
    url = f"{gw.url}/models/iris/{alias}/invocations"
    work = [[_bodies(rng) for _ in range(each)] for _ in range(clients)]
    answers: list[list[tuple[int, str, bytes]]] = [[] for _ in work]

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            answers[i] = [_post(c, url, *request) for request in work[i]]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for requests, got in zip(work, answers, strict=True):
        assert got == _alone(gw, requests)
        assert all(status == 200 for status, _, _ in got)
    merged = metric(gw, "model_gateway_batched_requests_total", name="iris",
                    alias=alias) - batched_before
    assert merged >= clients * each // 4, f"only {merged} of {clients * each} were merged"
    status = gw.status("iris", alias)["batching"]
    assert status["max_batch_size"] == 64 and status["max_wait_ms"] == 0
    assert status["mean_batch_size"] > 1


def test_concurrent_clients_get_exactly_their_own_answers(gw: GatewayProcess) -> None:
    _clients_at_once(gw, "batched", 32, 25)


def test_two_workers_two_slots_same_answers(gw: GatewayProcess) -> None:
    """The direct launcher with two uvicorn workers: two merged calls at a time."""
    _clients_at_once(gw, "workers", 16, 15)


def test_the_plain_asgi_path_batches_the_same(start_gateway: Any) -> None:
    """With the server's fast path off, every request takes the ASGI path, which carries
    the batcher as well."""
    gw = start_gateway([{"name": "iris", "alias": "champion", "preload": True},
                        {"name": "iris", "alias": "batched", "preload": True,
                         "model_uri": "models:/iris@champion",
                         "batching": {"max_batch_size": 64}}],
                       env={"MODEL_GATEWAY_FAST_PATH": "off"})
    assert wait_for(lambda: gw.client.get("/readyz").status_code == 200, 120), gw.log()
    assert "serving every request through the plain ASGI path" in gw.log()
    _clients_at_once(gw, "batched", 16, 15)


def test_a_bad_payload_does_not_fail_its_companions(gw: GatewayProcess) -> None:
    good = [("application/json", b'{"dataframe_split": {"columns": %s, "data": [[%d.5, 3.0, '
             b'1.5, 0.2]]}}' % (str(IRIS_COLUMNS).replace("'", '"').encode(), i))
            for i in range(6)]
    # Same format, columns and kinds of values, so it is merged with the good ones: the
    # model refuses a NaN, and with it the whole merged call.
    bad = ("application/json", b'{"dataframe_split": {"columns": %s, "data": [[NaN, 3.0, '
           b'1.5, 0.2]]}}' % str(IRIS_COLUMNS).replace("'", '"').encode())
    before = metric(gw, "model_gateway_batch_fallbacks_total", name="iris", alias="waits",
                    reason="status")
    requests = [*good[:3], bad, *good[3:]]
    got = _together(gw, "waits", requests)
    assert got == _alone(gw, requests)
    assert got[3][0] == 400 and all(g[0] == 200 for i, g in enumerate(got) if i != 3)
    assert metric(gw, "model_gateway_batch_fallbacks_total", name="iris", alias="waits",
                  reason="status") > before


def test_answers_that_do_not_line_up_with_rows_are_never_split(gw: GatewayProcess) -> None:
    requests = [("application/json", b'{"dataframe_split": {"columns": ["x"], "data": %s}}'
                 % str([[0.5]] * n).encode()) for n in (1, 2, 3, 1, 2, 3)]
    before = metric(gw, "model_gateway_batch_fallbacks_total", name="rowcount",
                    alias="waits", reason="row_count")
    got = _together(gw, "waits", requests, model="rowcount")
    assert [body for _, _, body in got] == [b'{"predictions": [%d]}' % n
                                            for n in (1, 2, 3, 1, 2, 3)]
    assert got == _alone(gw, requests, model="rowcount", alias="main")
    assert metric(gw, "model_gateway_batch_fallbacks_total", name="rowcount", alias="waits",
                  reason="row_count") > before


def test_csv_with_one_header_merges(gw: GatewayProcess) -> None:
    header = ",".join(IRIS_COLUMNS)
    requests = [("text/csv", f"{header}\n{i}.1,3.5,1.4,0.2\n{i}.2,3.0,5.1,1.8\n".encode())
                for i in range(1, 8)]
    # Another header (columns reordered) and quoted CSV go alone, and answer as alone.
    requests += [("text/csv", b"sepal_width,sepal_length,petal_length,petal_width\n"
                              b"3.5,5.1,1.4,0.2\n"),
                 ("text/csv", f'{header}\n"5.1",3.5,1.4,0.2\n'.encode())]
    before = metric(gw, "model_gateway_batched_requests_total", name="iris", alias="waits")
    got = _together(gw, "waits", requests)
    assert got == _alone(gw, requests)
    assert all(status == 200 for status, _, _ in got)
    assert metric(gw, "model_gateway_batched_requests_total", name="iris",
                  alias="waits") - before >= 2


def test_other_routes_and_formats_pass_through(gw: GatewayProcess) -> None:
    ping = gw.client.get("/models/iris/waits/ping")
    assert ping.status_code == 200
    broken = _together(gw, "waits", [("application/json", b"{not json")] * 3)
    assert broken == _alone(gw, [("application/json", b"{not json")] * 3)
    assert broken[0][0] == 400


def test_batching_is_off_unless_configured(gw: GatewayProcess) -> None:
    assert gw.status("iris", "champion")["batching"] is None
    requests = [_bodies(random.Random(i)) for i in range(16)]
    _together(gw, "champion", requests)
    assert metric(gw, "model_gateway_batch_size_count", name="iris", alias="champion") == 0


def test_a_batch_never_spans_two_versions(start_gateway: Any, registry: Registry) -> None:
    """Under load, the alias moves: every answer's predictions come from the version its
    X-Model-Version header names (const v1 predicts 1.0, v2 predicts 2.0)."""
    move_alias(registry, "t-batch", "1")
    try:
        gw = start_gateway([{"name": "const", "alias": "t-batch", "poll_interval": "1s",
                             "drain_timeout": "5s", "batching": {"max_batch_size": 32}}])
        assert gw.predict("const", "t-batch", X).status_code == 200
        with Load(gw, "const", "t-batch", clients=16) as load:
            time.sleep(1)
            move_alias(registry, "t-batch", "2")
            assert wait_for(lambda: load.saw(2.0), 60), gw.log()
            time.sleep(1)
        assert load.failures() == []
        assert all(a[3] == ("2" if a[2] == 2.0 else "1") for a in load.all)
        assert metric(gw, "model_gateway_batched_requests_total", name="const",
                      alias="t-batch") > 0
    finally:
        move_alias(registry, "t-batch", "1")

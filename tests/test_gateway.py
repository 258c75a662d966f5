"""The gateway core against real runners: routing, passthrough, errors, lifecycle."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psutil
import pytest
import yaml

from tests.conftest import (
    GatewayProcess,
    owned_processes,
    runner_processes,
    split_answers,
    wait_for,
)
from tests.registry import IRIS_COLUMNS, Registry

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
IRIS = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": ROWS}}
EXPECTED = [0, 2]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["fork", "direct", "cli", "plain"])
def gw(request: pytest.FixtureRequest, registry: Registry,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway with warm runners, shared by the read-only tests of this module.

    Every launcher must serve the same protocol with the same errors, so the module runs
    once per launcher (``defaults.launcher``), and once more (``plain``, fork launcher)
    with the fast path's uvicorn self-check made to fail: every request then takes the
    plain ASGI path, which must be complete on its own.
    """
    plain = request.param == "plain"
    launcher = "fork" if plain else request.param
    config = {"tracking_uri": registry.tracking_uri,
              "defaults": {"startup_timeout": "2m", "launcher": launcher},
              "endpoints": [
                  {"name": "iris", "alias": "champion"},
                  {"name": "iris", "alias": "cli", "model_uri": "models:/iris@champion",
                   "launcher": "cli"},
                  {"name": "iris v1.0", "alias": "local", "model_uri": registry.iris_path,
                   "nice": 5},
                  {"name": "sleepy", "alias": "main", "request_timeout": "2s"},
                  {"name": "ghost", "alias": "x", "model_uri": "models:/no-such-model@nope"},
              ]}
    env = {"MODEL_GATEWAY_FAST_PATH": "off"} if plain else {}
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("shared"), env)
    warning = "serving every request through the plain ASGI path"
    assert (warning in gateway.log()) == plain, gateway.log()
    yield gateway
    log = gateway.log()
    assert gateway.stop() == 0, log


def test_nice_lowers_a_runners_cpu_priority_and_its_childrens(gw: GatewayProcess) -> None:
    assert gw.predict("iris v1.0", "local", IRIS).status_code == 200
    assert gw.predict("iris", "champion", IRIS).status_code == 200
    for alias, name, nice in (("local", "iris v1.0", 5), ("champion", "iris", 0)):
        runner = psutil.Process(gw.status(name, alias)["runner"]["pid"])
        family = [runner, *runner.children(recursive=True)]
        assert {p.nice() for p in family} == {nice}, (alias, family)


def test_json_prediction_with_version_headers(gw: GatewayProcess) -> None:
    resp = gw.predict("iris", "champion", IRIS, headers={"X-Request-Id": "req-123",
                                                         "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"predictions": EXPECTED}
    assert resp.headers["x-model-version"] == "1"
    assert resp.headers["x-model-uri"] == "models:/iris/1"
    assert resp.headers["x-request-id"] == "req-123"
    assert resp.headers["content-type"] == "application/json"
    assert "connection" not in resp.headers or resp.headers["connection"] == "keep-alive"


def test_csv_and_parquet_pass_through(gw: GatewayProcess) -> None:
    frame = pd.DataFrame(ROWS, columns=IRIS_COLUMNS)
    csv = gw.client.post("/models/iris/champion/invocations", content=frame.to_csv(index=False),
                         headers={"Content-Type": "text/csv"})
    assert csv.status_code == 200, csv.text
    assert csv.json() == {"predictions": EXPECTED}
    buf = io.BytesIO()
    frame.to_parquet(buf)
    parquet = gw.client.post("/models/iris/champion/invocations", content=buf.getvalue(),
                             headers={"Content-Type": "application/vnd.apache.parquet"})
    assert parquet.status_code == 200, parquet.text
    assert parquet.json() == {"predictions": EXPECTED}


def test_mlflow_bad_payload_answer_reaches_caller(gw: GatewayProcess) -> None:
    resp = gw.predict("iris", "champion", {"dataframe_split": {"columns": ["a"], "data": [[1]]}})
    assert resp.status_code == 400
    assert resp.json()["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE")
    resp = gw.client.post("/models/iris/champion/invocations", content=b"a,b",
                          headers={"Content-Type": "text/unknown"})
    assert resp.status_code == 415  # MLflow's own answer for an unsupported content type


def test_ping_health_version_routes(gw: GatewayProcess) -> None:
    gw.predict("iris", "champion", IRIS)
    assert gw.client.get("/models/iris/champion/ping").status_code == 200
    assert gw.client.get("/models/iris/champion/health").status_code == 200
    version = gw.client.get("/models/iris/champion/version")
    assert version.status_code == 200 and version.text.startswith("3.")
    wrong = gw.client.get("/models/iris/champion/invocations")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_cli_launcher_serves_the_same_protocol(gw: GatewayProcess) -> None:
    resp = gw.predict("iris", "cli", IRIS)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"predictions": EXPECTED}
    assert resp.headers["x-model-version"] == "1"
    bad = gw.predict("iris", "cli", {"dataframe_split": {"columns": ["a"], "data": [[1]]}})
    assert bad.status_code == 400 and "error_code" in bad.json()
    status = gw.status("iris", "cli")
    # `mlflow models serve` keeps its CLI process beside the uvicorn it starts.
    assert len(status["runner"]) and status["state"] == "ready"


def _unix_sockets_at(path: str) -> int:
    """Sockets bound to ``path``: a listener plus one per accepted connection
    (/proc/net/unix lists them with their path)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[-1] == path)


def test_runner_is_reached_over_its_unix_socket(gw: GatewayProcess) -> None:
    """Runners started by runners.serve (fork, direct) listen on a unix socket in a
    directory only the gateway's user can enter, and on no TCP port; `mlflow models
    serve` has no socket and is reached by TCP."""
    launcher = yaml.safe_load(gw.config_path.read_text())["defaults"]["launcher"]
    assert gw.predict("iris", "cli", IRIS).status_code == 200
    cli = gw.status("iris", "cli")["runner"]
    assert cli["unix_socket"] is None and cli["port"]
    # Checked right after a request: an idle connection is closed after a few seconds.
    assert gw.predict("iris", "champion", IRIS).status_code == 200
    runner = gw.status("iris", "champion")["runner"]
    if launcher == "cli":
        assert runner["unix_socket"] is None
        return
    path = runner["unix_socket"]
    assert runner["port"] is None
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert _unix_sockets_at(path) >= 2  # listening, and the gateway's connection accepted


def _writes(pid: int) -> int:
    """write(2)-like calls made so far by ``pid`` (uvloop sends with write/writev)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/PID/io")


def test_a_small_answer_costs_one_write_each_way(gw: GatewayProcess) -> None:
    """The request goes to the runner in one write and the answer's head and body to the
    caller in one more (uvicorn alone writes head and body apart), access lines in
    batches: about 2 writes per request, where 3 would mean the answer went out in two."""
    with httpx.Client(base_url=gw.url, timeout=120) as client:  # one keep-alive connection
        assert client.get("/models/iris/champion/ping").status_code == 200
        before = _writes(gw.proc.pid)
        for _ in range(200):
            resp = client.get("/models/iris/champion/ping")
            assert resp.status_code == 200 and resp.headers["x-model-version"] == "1"
        per_request = (_writes(gw.proc.pid) - before) / 200
    if _plain(gw):
        assert 2.5 <= per_request < 3.5, per_request  # uvicorn alone: head and body apart
    else:
        assert 1.9 <= per_request < 2.5, per_request


def _plain(gw: GatewayProcess) -> bool:
    return gw.env.get("MODEL_GATEWAY_FAST_PATH") == "off"


def _answers(sock: socket.socket, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Everything ``sock`` receives until the gateway closes it, split into one
    Content-Length framed answer per request method."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return split_answers(data, methods)


def test_pipelined_requests_are_answered_in_order(gw: GatewayProcess) -> None:
    """Requests sent back to back on one connection, the first to a warm runner (served
    without the ASGI cycle), the rest queued behind it: answers in order, then close."""
    gw.predict("iris", "champion", IRIS)
    body = json.dumps(IRIS).encode()
    base = b"/models/iris/champion/"
    sent = [
        b"GET " + base + b"ping HTTP/1.1\r\nhost: t\r\nx-request-id: one\r\n\r\n",
        b"POST " + base + b"invocations HTTP/1.1\r\nhost: t\r\nx-request-id: two\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body,
        b"HEAD " + base + b"ping HTTP/1.1\r\nhost: t\r\nx-request-id: three\r\n\r\n",
        b"GET " + base + b"version?x=1 HTTP/1.1\r\nhost: t\r\nx-request-id: four\r\n"
        b"connection: close\r\n\r\n"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(b"".join(sent))
        answers = _answers(sock, ["GET", "POST", "HEAD", "GET"])
    assert [a[0] for a in answers] == [200, 200, 405, 200]  # MLflow's /ping is GET only
    assert [a[1]["x-request-id"] for a in answers] == ["one", "two", "three", "four"]
    assert json.loads(answers[1][2]) == {"predictions": EXPECTED}
    assert answers[2][2] == b"" and answers[3][2].startswith(b"3.")
    assert answers[3][1]["connection"] == "close"
    assert all(a[1]["x-model-version"] == "1" for a in answers)


def test_warm_answers_of_every_size_and_http_1_0(gw: GatewayProcess) -> None:
    """Small requests to a warm runner whose answers are too large to hold (they stream),
    and an HTTP/1.0 caller, who is answered and then disconnected."""
    rows = {"dataframe_split": {"columns": ["seconds"], "data": [[0]] * 60_000}}
    body = json.dumps(rows, separators=(",", ":")).encode()
    assert len(body) < 256 * 1024  # sent in one piece; the answer is larger
    for _ in range(3):
        resp = gw.client.post("/models/sleepy/main/invocations", content=body,
                              headers={"content-type": "application/json"})
        assert resp.status_code == 200
        assert len(resp.content) > 256 * 1024 and resp.json()["predictions"] == [0.0] * 60_000
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(b"GET /models/sleepy/main/ping HTTP/1.0\r\n\r\n")
        (status, headers, answer), = _answers(sock, ["GET"])
    assert status == 200 and headers["x-model-version"] == "1"
    assert headers["connection"] == "close" and len(answer) == int(headers["content-length"])


def test_caller_leaving_mid_request_frees_the_runner(gw: GatewayProcess) -> None:
    slow = json.dumps({"dataframe_split": {"columns": ["seconds"], "data": [[1]]}}).encode()
    assert gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                             "data": [[0]]}}).status_code == 200
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(b"POST /models/sleepy/main/invocations HTTP/1.1\r\nhost: t\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % len(slow) + slow)
        wait_for(lambda: gw.status("sleepy", "main")["runner"]["in_flight"] == 1, 10)
    assert wait_for(lambda: gw.status("sleepy", "main")["runner"]["in_flight"] == 0, 10)
    again = gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                              "data": [[0.5]]}})
    assert again.status_code == 200 and again.json() == {"predictions": [0.5]}


def test_names_with_spaces_and_dots_are_percent_decoded(gw: GatewayProcess) -> None:
    resp = gw.client.post("/models/iris%20v1.0/local/invocations", json=IRIS)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"predictions": EXPECTED}
    assert resp.headers["x-model-version"] == "-"  # a path has no registry version
    status = gw.client.get("/models/iris%20v1.0/local").json()
    assert status["state"] == "ready" and status["version"] is None


def test_status_and_listing(gw: GatewayProcess) -> None:
    gw.predict("iris", "champion", IRIS)
    status = gw.status("iris", "champion")
    assert status["state"] == "ready"
    assert status["model_uri"] == "models:/iris@champion"
    assert status["version"] == "1"
    assert set(status["runner"]) >= {"pid", "port", "started_at"}
    assert status["last_error"] is None
    listed = gw.client.get("/models").json()["endpoints"]
    assert {(e["name"], e["alias"]) for e in listed} == {
        ("iris", "champion"), ("iris", "cli"), ("iris v1.0", "local"), ("sleepy", "main"),
        ("ghost", "x")}
    assert gw.client.get("/healthz").status_code == 200
    assert gw.client.get("/readyz").status_code == 200


def test_undeclared_endpoint_is_404_without_echo(gw: GatewayProcess) -> None:
    for path in ["/models/<script>evil/x/invocations", "/models/iris/nope/invocations",
                 "/models/<script>evil/x", "/nothing/<script>evil"]:
        resp = gw.client.post(path, content=b"{}") if path.endswith("invocations") \
            else gw.client.get(path)
        assert resp.status_code == 404, path
        assert "error" in resp.json()
        assert "evil" not in resp.text and "nope" not in resp.text


def test_missing_model_is_503_and_others_keep_working(gw: GatewayProcess) -> None:
    resp = gw.predict("ghost", "x", IRIS)
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    error = resp.json()["error"]
    assert error["code"] == "runner_unavailable"
    assert "no-such-model" in error["message"]
    status = gw.status("ghost", "x")
    assert status["state"] == "failed" and "no-such-model" in status["last_error"]
    # Asked again at once: the backoff answers without starting anything.
    again = gw.predict("ghost", "x", IRIS)
    assert again.status_code == 503 and "retry-after" in again.headers
    assert gw.predict("iris", "champion", IRIS).status_code == 200


def test_slow_runner_is_504_and_gateway_survives(gw: GatewayProcess) -> None:
    fast = gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                              "data": [[0.1]]}})
    assert fast.status_code == 200 and fast.json() == {"predictions": [0.1]}
    slow = gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                              "data": [[4]]}})
    assert slow.status_code == 504
    assert slow.json()["error"]["code"] == "runner_timeout"
    assert gw.predict("iris", "champion", IRIS).status_code == 200


def test_large_bodies_stream_both_ways(gw: GatewayProcess) -> None:
    rows = ROWS * 15_000  # ~1 MB of JSON up, 30,000 predictions down

    def chunks() -> Iterator[bytes]:  # no Content-Length: the upload is chunked
        body = json.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": rows}}).encode()
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    resp = gw.client.post("/models/iris/champion/invocations", content=chunks(),
                          headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["predictions"] == EXPECTED * 15_000


def test_concurrent_first_requests_start_one_runner(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "iris", "alias": "champion"}])
    assert runner_processes(gw.owner) == []
    assert gw.status("iris", "champion")["state"] == "cold"
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(len(runner_processes(gw.owner)))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: gw.predict("iris", "champion", IRIS), range(8)))
    finally:
        stop.set()
        sampler.join()
    assert [a.status_code for a in answers] == [200] * 8
    assert max(seen) == 1
    assert len(runner_processes(gw.owner)) == 1
    assert len({a.headers["x-model-version"] for a in answers}) == 1


def test_killed_runner_gives_502_then_restarts(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "sleepy", "alias": "main"}])
    payload = {"dataframe_split": {"columns": ["seconds"], "data": [[30]]}}
    assert gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                             "data": [[0]]}}).status_code == 200
    first = gw.status("sleepy", "main")["runner"]["pid"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(gw.predict, "sleepy", "main", payload)
        wait_for(lambda: gw.status("sleepy", "main")["runner"]["in_flight"] == 1, 10)
        os.killpg(first, signal.SIGKILL)
        cut = pending.result(timeout=30)
    assert cut.status_code == 502
    assert cut.json()["error"]["code"] == "runner_unreachable"
    status = wait_for(lambda: (s := gw.status("sleepy", "main"))["state"] == "failed" and s, 5)
    assert status and "exited with code -9" in status["last_error"]
    again = gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                              "data": [[0]]}})
    assert again.status_code == 200
    assert gw.status("sleepy", "main")["runner"]["pid"] != first


def test_sigterm_drains_in_flight_and_leaves_no_process(start_gateway: Any) -> None:
    """Two requests in flight: one over the runner connection a first request left idle
    (answered from callbacks), one that needs a new connection (the ASGI path)."""
    gw = start_gateway([{"name": "sleepy", "alias": "main"}, {"name": "iris", "alias": "champion"}])
    assert gw.predict("iris", "champion", IRIS).status_code == 200
    assert gw.predict("sleepy", "main", {"dataframe_split": {"columns": ["seconds"],
                                                             "data": [[0]]}}).status_code == 200
    payload = {"dataframe_split": {"columns": ["seconds"], "data": [[3]]}}
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(gw.predict, "sleepy", "main", payload) for _ in range(2)]
        wait_for(lambda: gw.status("sleepy", "main")["runner"]["in_flight"] == 2, 60)
        assert len(runner_processes(gw.owner)) == 2
        gw.proc.send_signal(signal.SIGTERM)
        answers = [p.result(timeout=60) for p in pending]
    for answer in answers:
        assert answer.status_code == 200 and answer.json() == {"predictions": [3.0]}
    assert gw.proc.wait(60) == 0
    assert wait_for(lambda: owned_processes(gw.owner) == [], 5), owned_processes(gw.owner)


def test_preload_starts_at_startup_and_gates_readiness(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "iris", "alias": "champion", "preload": True},
                        {"name": "sleepy", "alias": "main"}])
    early = gw.client.get("/readyz")
    assert early.status_code == 503
    # Ready means ready: the zygote has imported MLflow and the resolver answers, so the
    # first cold start after readiness is as fast as any other.
    assert {"zygote: starting", "iris/champion: starting"} <= set(early.json()["waiting"])
    assert wait_for(lambda: gw.client.get("/readyz").status_code == 200, 120)
    assert gw.status("iris", "champion")["state"] == "ready"
    assert gw.status("sleepy", "main")["state"] == "cold"  # not preloaded: still lazy
    assert len(runner_processes(gw.owner)) == 1

"""Raw-socket probes against a real gateway with keys and admin tokens, and a real MLflow
runner: the attacks a hostile client tries, old and new, each followed by the victim
check (a well-behaved client on another connection gets exactly its own answer)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import GatewayProcess, metric
from tests.registry import IRIS_COLUMNS, Registry

pytestmark = pytest.mark.slow

KEY, ADMIN = "hostile-key", "hostile-admin"
AUTH = f"authorization: Bearer {KEY}\r\n".encode()
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
BODY = json.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": ROWS}}).encode()
PREDICT = (b"POST /models/iris/champion/invocations HTTP/1.1\r\nhost: t\r\n" + AUTH
           + b"content-type: application/json\r\n")


@pytest.fixture(scope="module")
def gw(registry: Registry, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[GatewayProcess]:
    config = {"tracking_uri": registry.tracking_uri,
              "auth": {"api_keys": [KEY], "admin_tokens": [ADMIN]},
              "limits": {"header_timeout": "2s", "body_timeout": "2s", "send_timeout": "2s"},
              "max_header_size": "16KiB",
              "endpoints": [{"name": "iris", "alias": "champion", "preload": True,
                             "max_concurrency": 1}]}
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("hostile"))
    deadline = time.monotonic() + 120
    while gateway.client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.2)
    yield gateway
    assert gateway.stop() == 0


def raw(gw: GatewayProcess, data: bytes | list[bytes], *, pause: float = 0.0,
        timeout: float = 10) -> bytes:
    """Send ``data`` (its parts ``pause`` apart) and read until the gateway closes."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        try:
            for part in [data] if isinstance(data, bytes) else data:
                sock.sendall(part)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused meanwhile: read what was answered
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def statuses(data: bytes) -> list[int]:
    """The status of every answer in ``data`` (an answer may follow a body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def victim(gw: GatewayProcess) -> None:
    answer = gw.client.post("/models/iris/champion/invocations", content=BODY,
                            headers={"authorization": f"Bearer {KEY}", "x-request-id": "v-1",
                                     "content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "v-1"
    assert answer.json() == {"predictions": [0, 2]}


@pytest.fixture(autouse=True)
def victim_check(gw: GatewayProcess) -> Iterator[None]:
    yield
    victim(gw)
    assert gw.proc.poll() is None, gw.log()


# -- the classes the fault report found ----------------------------------------------------
@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["one-segment", "trailer-later"])
def test_trailers_are_never_request_headers(gw: GatewayProcess, pause: float) -> None:
    head = (b"POST /models/iris/champion/invocations HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n")
    chunk = b"%x\r\n%s\r\n0\r\n" % (len(BODY), BODY)
    trailer = f"authorization: Bearer {KEY}\r\nx-request-id: evil\r\n\r\n".encode()
    for auth in [b"", b"authorization: Bearer wrong\r\n"]:
        data = raw(gw, [head + auth + b"connection: close\r\n\r\n" + chunk, trailer],
                   pause=pause)
        assert statuses(data) == [401], data
    data = raw(gw, [head + AUTH + b"connection: close\r\n\r\n" + chunk, trailer], pause=pause)
    assert statuses(data) == [200] and b"evil" not in data


def test_upgrade_is_refused_and_its_body_never_read_as_a_request(gw: GatewayProcess) -> None:
    inner = b"GET /models/iris/champion/ping HTTP/1.1\r\nhost: t\r\n" + AUTH + b"\r\n"
    data = raw(gw, PREDICT + b"connection: Upgrade\r\nupgrade: h2c\r\ncontent-length: %d\r\n\r\n"
               % len(inner) + inner + inner)
    assert statuses(data) == [400] and b"upgrade_not_supported" in data


def test_a_stalled_body_holds_no_runner(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as stalled:
        stalled.sendall(PREDICT + b"content-length: %d\r\n\r\n" % len(BODY) + BODY[:10])
        time.sleep(0.3)
        victim(gw)  # max_concurrency 1, and the stalled caller holds no slot of it
        began = time.monotonic()
        data = stalled.recv(65536)
        assert statuses(data) == [408] and 1.0 < time.monotonic() - began < 4
    assert gw.status("iris", "champion")["state"] == "ready"


def test_huge_and_slow_heads(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as big:
        sent = 0
        try:
            big.sendall(b"GET /healthz HTTP/1.1\r\nx: ")
            for _ in range(384):  # 24 MiB, were it all read
                big.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 4 * 2**20
    slow = raw(gw, [b"GET /healthz HTTP/1.1\r\n"] + [b"x"] * 8, pause=0.5)
    assert statuses(slow) == [408]
    assert metric(gw, "model_gateway_client_errors_total", reason="header_timeout") >= 1


def test_a_caller_that_never_reads_is_dropped(gw: GatewayProcess) -> None:
    """Answers a caller does not read first fill the kernel's buffers (megabytes), then
    the gateway's own send buffer: from then on nothing more of the caller's is served,
    and after send_timeout it is dropped."""
    many = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": ROWS * 5000}}
    body = json.dumps(many).encode()
    request = PREDICT + b"content-length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with contextlib.suppress(OSError):  # blocked when the gateway stops reading, or reset
            for _ in range(400):  # 12 MB of answers, were they all served
                sock.sendall(request)
        deadline = time.monotonic() + 20
        while metric(gw, "model_gateway_client_errors_total", reason="send_timeout") < 1:
            assert time.monotonic() < deadline, "the non-reading caller was never dropped"
            time.sleep(0.2)
    served = metric(gw, "model_gateway_requests_total", name="iris", alias="champion",
                    status_class="2xx")
    assert served < 300  # not all 400: served only while the caller's buffers had room
    runner = gw.client.get("/admin/endpoints", headers={"authorization": f"Bearer {ADMIN}"}
                           ).json()["endpoints"][0]["runner"]
    assert runner["in_flight"] == 0


def test_request_ids_and_access_lines_cannot_be_forged(gw: GatewayProcess) -> None:
    for unsafe in ["x status=200 forged=1", "z" * 600]:
        answer = gw.client.get("/models/iris/champion/ping",
                               headers={"authorization": f"Bearer {KEY}", "x-request-id": unsafe})
        assert answer.headers["x-request-id"] != unsafe
    raw(gw, b"GET /models/iris/champion%0Aforged/ping HTTP/1.1\r\nhost: t\r\n" + AUTH
        + b"connection: close\r\n\r\n")
    assert "forged=1" not in gw.log()
    assert not any(line.startswith("forged") for line in gw.log().splitlines())


def test_no_redirect_from_the_host_header(gw: GatewayProcess) -> None:
    for path in ["/models/", "/admin/endpoints/", "/metrics/"]:
        data = raw(gw, f"GET {path} HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n"
                   .encode())
        assert statuses(data) == [404] and b"evil.example" not in data


def test_status_routes_need_a_key_and_keep_process_details_for_admins(
        gw: GatewayProcess) -> None:
    for path in ["/models", "/models/iris/champion"]:
        assert gw.client.get(path).status_code == 401
    auth = {"authorization": f"Bearer {KEY}"}
    public = json.dumps(gw.client.get("/models", headers=auth).json())
    assert '"pid"' not in public and "unix_socket" not in public and ".sock" not in public
    admin: Any = gw.client.get("/admin/endpoints",
                               headers={"authorization": f"Bearer {ADMIN}"}).json()
    runner = admin["endpoints"][0]["runner"]
    assert runner["pid"] and runner["port"] is None and runner["unix_socket"].endswith(".sock")
    listening = [c for c in psutil.Process(runner["pid"]).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening == []  # reachable through its private socket only


# -- classic attacks that already failed; kept so that none comes back -----------------------
CLASSIC = {
    "content-length and chunked": PREDICT + b"content-length: 4\r\ntransfer-encoding: chunked"
    b"\r\n\r\n0\r\n\r\nGET /admin/endpoints HTTP/1.1\r\nhost: t\r\n\r\n",
    "two content-lengths": PREDICT + b"content-length: 4\r\ncontent-length: 40\r\n\r\nabcd",
    "obfuscated chunked": PREDICT + b"transfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
    "chunked, then identity": PREDICT + b"transfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "space before colon": PREDICT + b"transfer-encoding : chunked\r\n\r\n0\r\n\r\n",
    "header injection": b"GET /healthz HTTP/1.1\r\nx: a\rb\r\n\r\n",
    "bare newline": b"GET /healthz HTTP/1.1\nhost: t\n\n",
    "bad chunk size": PREDICT + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(CLASSIC))
def test_classic_smuggling_gets_one_answer_at_most(gw: GatewayProcess, name: str) -> None:
    data = raw(gw, CLASSIC[name], timeout=6)
    found = statuses(data)
    assert len(found) <= 1 and all(s in (400, 401, 411, 501) or s < 300 for s in found), data


@pytest.mark.parametrize("path", ["/admin/endpoints", "/Admin/endpoints", "/admin//endpoints",
                                  "//admin/endpoints", "/models/../admin/endpoints",
                                  "/admin/%65ndpoints", "/models/iris/champion/../../../admin"
                                  "/endpoints", "/admin/endpoints?x=/models/iris/champion/ping"])
def test_no_path_variant_reaches_the_admin_api_without_a_token(gw: GatewayProcess,
                                                               path: str) -> None:
    data = raw(gw, f"GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode())
    assert statuses(data)[0] in (401, 404), data


def test_pipelining_stays_in_step(gw: GatewayProcess) -> None:
    one = PREDICT + b"x-request-id: p1\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
    two = (b"GET /models/iris/champion/ping HTTP/1.1\r\nhost: t\r\n" + AUTH
           + b"x-request-id: p2\r\nconnection: close\r\n\r\n")
    data = raw(gw, one + two)
    assert statuses(data) == [200, 200]
    assert data.index(b"x-request-id: p1") < data.index(b"x-request-id: p2")

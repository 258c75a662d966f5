"""Closed by default: api keys on inference, input limits, and structured logs."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_for
from tests.test_follow import X

pytestmark = pytest.mark.slow

KEY, TEAM_KEY, ADMIN = "key-for-tests", "team-key-for-tests", "admin-for-tests"


def const(alias: str, **extra: Any) -> dict[str, Any]:
    return {"name": "const", "alias": alias, "model_uri": "models:/const/1", **extra}


def test_api_keys_guard_inference(start_gateway: Any) -> None:
    gw = start_gateway([const("a"), const("open", public=True),
                        const("team", api_keys=[TEAM_KEY])],
                       auth={"api_keys": [KEY], "admin_tokens": [ADMIN]})
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN}"},
                    {"Authorization": f"Basic {KEY}"}]:
        refused = gw.predict("const", "a", X, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "unauthorized"
    ok = gw.predict("const", "a", X, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json() == {"predictions": [1.0]}
    assert gw.predict("const", "open", X).status_code == 200  # public: true
    assert gw.predict("const", "team", X, headers={"Authorization": f"Bearer {KEY}"}
                      ).status_code == 401  # its own keys only
    assert gw.predict("const", "team", X, headers={"Authorization": f"Bearer {TEAM_KEY}"}
                      ).status_code == 200
    # A refused request never starts a runner.
    assert gw.status("const", "a")["state"] == "ready"
    for secret in (KEY, TEAM_KEY, ADMIN):
        assert secret not in gw.log()
        assert secret not in gw.client.get("/models").text


def test_inference_is_open_without_keys_and_says_so(start_gateway: Any) -> None:
    gw = start_gateway([const("a")])
    assert gw.predict("const", "a", X).status_code == 200
    assert "inference routes are open" in gw.log()


def raw(gw: GatewayProcess, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; return what came back before it closed."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def test_oversized_truncated_and_malformed_requests(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], max_body_size="1MiB", max_header_size="8KiB")
    assert gw.predict("const", "a", X).status_code == 200
    big = b"x" * (2 * 2**20)
    declared = gw.client.post("/models/const/a/invocations", content=big,
                              headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting can catch it
        for _ in range(32):
            yield b"x" * 65536

    chunked = gw.client.post("/models/const/a/invocations", content=chunks(),
                             headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    headers = gw.client.post("/models/const/a/invocations", content=json.dumps(X),
                             headers={"Content-Type": "application/json",
                                      "X-Filler": "y" * 9000})
    assert headers.status_code == 431
    # A body cut short: the client promises 1000 bytes, sends 10 and hangs up.
    raw(gw, b"POST /models/const/a/invocations HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\":")
    # Not HTTP at all, and a broken chunked encoding.
    assert raw(gw, b"\x16\x03\x01 hello\r\n\r\n").startswith(b"HTTP/1.1 400")
    raw(gw, b"POST /models/const/a/invocations HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot-hex\r\n")
    # Bad JSON is MLflow's 400; an undeclared route is ours.
    bad = gw.client.post("/models/const/a/invocations", content=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    # Through all of it the gateway keeps serving.
    assert gw.predict("const", "a", X).json() == {"predictions": [1.0]}
    assert gw.proc.poll() is None
    # The gateway's own lines: a runner may log MLflow's traceback for a body cut short.
    own = [line for line in gw.log().splitlines() if "model_gateway.runner" not in line]
    assert not any("Traceback" in line for line in own)


def test_json_logs_with_one_access_line_per_request(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], log_format="json")
    answer = gw.predict("const", "a", X, headers={"X-Request-Id": "trace-42"})
    assert answer.status_code == 200
    lines = wait_for(lambda: [json.loads(line) for line in gw.log().splitlines()
                              if '"trace-42"' in line], 5)
    assert len(lines) == 1
    access = lines[0]
    assert access["endpoint"] == "const/a" and access["version"] == "1"
    assert access["status"] == 200 and access["duration_ms"] > 0
    assert access["method"] == "POST" and access["route"] == "/models/const/a/invocations"
    # Runner output goes through the same logger, with endpoint and version fields.
    runner_lines = [json.loads(line) for line in gw.log().splitlines()
                    if line.startswith("{") and '"model_gateway.runner"' in line]
    assert runner_lines and all(r["endpoint"] == "const/a" for r in runner_lines)
    assert all(line.startswith("{") for line in gw.log().splitlines() if line.strip())


def test_access_log_can_be_turned_off(start_gateway: Any) -> None:
    gw = start_gateway([const("a")], access_log=False)
    assert gw.predict("const", "a", X, headers={"X-Request-Id": "quiet-1"}).status_code == 200
    assert "quiet-1" not in gw.log()

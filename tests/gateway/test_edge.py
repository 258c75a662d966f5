"""The HTTP edge against hostile clients, over raw sockets (fast tier: tiny runners).

Each probe is followed by the victim check: a well-behaved client on another connection
gets exactly its own answer. ``tests/test_hostile.py`` runs the same classes of attack
against MLflow runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import stat
import time
from typing import Any

import httpx
import pytest

from gateway.protocol import LINGER
from tests.gateway.conftest import Served, serve

pytestmark = pytest.mark.anyio

KEY, ADMIN = "key-for-edge-tests", "admin-for-edge-tests"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
LIMITS = {"header_timeout": "1s", "body_timeout": "1s", "send_timeout": "1s",
          "max_connections": 20}
CONFIG: dict[str, Any] = {
    "auth": {"api_keys": [KEY], "admin_tokens": [ADMIN]}, "limits": LIMITS,
    "max_header_size": "8KiB",
    "endpoints": [{"name": "tiny", "alias": "a", "model_uri": "/models/tiny-a"},
                  {"name": "tiny", "alias": "one", "model_uri": "/models/tiny-one",
                   "max_concurrency": 1}]}


async def victim(served: Served, alias: str = "a") -> None:
    """A well-behaved prediction gets its own answer, promptly."""
    async with httpx.AsyncClient(base_url=served.url, timeout=5) as client:
        answer = await client.post(f"/models/tiny/{alias}/invocations", content=b'{"v": 1}',
                                   headers={"authorization": f"Bearer {KEY}",
                                            "x-request-id": "victim-1"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "victim-1"
    assert answer.json()["body"] == '{"v": 1}'


def statuses(data: bytes) -> list[int]:
    """The status of every answer in ``data`` (an answer may follow a body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def client_errors(served: Served, reason: str) -> float:
    value = served.gateway.metrics.client_errors.labels(reason)._value.get()
    return float(value)


async def open_raw(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", served.port)


CHUNKED = (b"POST /models/tiny/a/invocations HTTP/1.1\r\nhost: t\r\n%s"
           b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "trailer-later"])
async def test_chunked_trailers_never_become_headers(split: bool) -> None:
    async with serve(CONFIG) as served:
        await victim(served)
        for head_auth, trailer, expected in [
                (b"", b"authorization: Bearer " + KEY.encode(), 401),
                (b"authorization: Bearer wrong\r\n", b"authorization: Bearer " + KEY.encode(),
                 401),
                (AUTH, b"x-request-id: evil\r\nx-forwarded-for: 6.6.6.6", 200)]:
            reader, writer = await open_raw(served)
            head = CHUNKED % head_auth
            if split:
                writer.write(head)
                await writer.drain()
                await asyncio.sleep(0.2)
            writer.write((b"" if split else head) + trailer + b"\r\n\r\n")
            await writer.drain()
            data = await reader.readuntil(b"\r\n\r\n")
            assert statuses(data) == [expected], data
            if expected == 200:
                length = int(data.split(b"content-length: ")[1].split(b"\r\n")[0])
                echo = json.loads(await reader.readexactly(length))
                assert b"x-request-id: evil" not in data
                assert echo["headers"]["x-request-id"] != "evil"
                assert echo["headers"]["x-forwarded-for"] == "127.0.0.1"
            writer.close()
        await victim(served)


async def test_upgrade_requests_are_refused_and_never_reframed() -> None:
    smuggled = b"GET /models/tiny/a/ping HTTP/1.1\r\nhost: t\r\n" + AUTH + b"\r\n"
    async with serve(CONFIG) as served:
        await victim(served)
        for method, extra in [(b"POST", b"content-length: %d\r\n" % len(smuggled)),
                              (b"GET", b"")]:
            request = (method + b" /models/tiny/a/invocations HTTP/1.1\r\nhost: t\r\n" + AUTH
                       + b"connection: Upgrade\r\nupgrade: websocket\r\n" + extra + b"\r\n"
                       + (smuggled if extra else b"") + smuggled)
            data = await served.raw(request)
            assert statuses(data) == [400], data  # one answer, then the connection closed
            assert b"upgrade_not_supported" in data
        assert client_errors(served, "upgrade_not_supported") == 2
        await victim(served)


@pytest.mark.parametrize("body", ["length", "chunked", "expect-100"])
async def test_a_stalled_body_holds_no_runner_and_is_cut_at_its_deadline(body: str) -> None:
    heads = {"length": b"content-length: 100\r\n\r\n{\"stall",
             "chunked": b"transfer-encoding: chunked\r\n\r\n10\r\n{\"stall",
             "expect-100": b"expect: 100-continue\r\ncontent-length: 100\r\n\r\n"}
    async with serve(CONFIG) as served:
        await victim(served, "one")
        reader, writer = await open_raw(served)
        writer.write(b"POST /models/tiny/one/invocations HTTP/1.1\r\nhost: t\r\n" + AUTH
                     + heads[body])
        await writer.drain()
        began = time.monotonic()
        await asyncio.sleep(0.3)
        await victim(served, "one")  # max_concurrency 1: the stalled caller holds no slot
        ep = served.gateway.pool.endpoints[("tiny", "one")]
        assert ep.runner is not None and ep.runner.in_flight == 0
        data = await asyncio.wait_for(reader.read(), 5)
        waited = time.monotonic() - began
        assert statuses(data)[-1] == 408 and b"body_timeout" in data, data
        assert 0.9 < waited < 3
        writer.close()
        await victim(served, "one")
        stopping = time.monotonic()
    # The refused connection's lingering close does not hold up a graceful stop.
    assert time.monotonic() - stopping < LINGER


async def test_heads_have_a_deadline_and_idle_connections_close() -> None:
    async with serve(CONFIG) as served:
        idle_reader, idle = await open_raw(served)
        slow_reader, slow = await open_raw(served)
        slow.write(b"GET /healthz HTTP/1.1\r\n")
        began = time.monotonic()
        for _ in range(4):  # a byte now and then: still one head, one deadline
            await asyncio.sleep(0.2)
            slow.write(b"x")
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed, no answer
        data = await asyncio.wait_for(slow_reader.read(), 5)
        assert statuses(data) == [408] and b"header_timeout" in data
        assert time.monotonic() - began < 3
        idle.close()
        slow.close()
        await victim(served)


async def test_a_head_past_max_header_size_is_refused_before_it_ends() -> None:
    async with serve(CONFIG) as served:
        reader, writer = await open_raw(served)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: ")
        sent, data = 0, b""
        for _ in range(384):  # up to 24 MiB, if the gateway kept reading
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), 0.005)
            if data:
                break
        assert statuses(data) == [431], data[:200]
        assert sent < 1 * 2**20  # refused at 8 KiB: nothing like the whole header was read
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
        writer.close()
        # Within the limit, on any route, and counted exactly:
        ok = await served.raw(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 7000
                              + b"\r\nconnection: close\r\n\r\n")
        assert statuses(ok) == [200]
        await victim(served)


async def test_a_client_that_never_reads_stops_being_served_and_is_dropped() -> None:
    async with serve(CONFIG) as served:
        await victim(served)
        ep = served.gateway.pool.endpoints[("tiny", "a")]
        assert ep.runner is not None
        request = (b"POST /models/tiny/a/invocations?size=200000 HTTP/1.1\r\nhost: t\r\n"
                   + AUTH + b"content-length: 2\r\n\r\n{}")
        _, writer = await open_raw(served)
        writer.transport.set_write_buffer_limits(high=2**24)  # type: ignore[union-attr]
        writer.write(request * 200)  # 40 MB of answers asked for, none read
        await asyncio.sleep(1.0)
        before = served.gateway.metrics.requests.labels("tiny", "a", "2xx")._value.get()
        assert before < 40, before  # served until the caller's buffers were full, no further
        async with asyncio.timeout(5):
            while client_errors(served, "send_timeout") < 1:
                await asyncio.sleep(0.05)
        assert ep.runner.in_flight == 0
        # Dropped with a reset: a FIN would wait behind the unread answers in the buffers.
        sock = writer.get_extra_info("socket")
        async with asyncio.timeout(5):
            while (error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) == 0:
                await asyncio.sleep(0.05)
        assert error == errno.ECONNRESET
        writer.close()
        await victim(served)


async def test_connections_past_max_connections_are_closed() -> None:
    async with serve(CONFIG) as served:
        held = [await open_raw(served) for _ in range(20)]
        reader, writer = await open_raw(served)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert client_errors(served, "connection_limit") >= 1
        for _, w in held:
            w.close()
        writer.close()
        await asyncio.sleep(0.1)
        await victim(served)


async def test_request_ids_and_logs_take_only_plain_values() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=5) as client:
        auth = {"authorization": f"Bearer {KEY}"}
        for unsafe in ["x status=200", "a" * 200, "é".encode(), "a\tb"]:
            answer = await client.get("/models/tiny/a/ping",
                                      headers={**auth, "x-request-id": unsafe})
            new = answer.headers["x-request-id"]
            assert len(new) == 32 and set(new) <= set("0123456789abcdef")  # a new one
        kept = await client.get("/models/tiny/a/ping",
                                headers={**auth, "x-request-id": "4bf92f3577b34da6-a3ce"})
        assert kept.headers["x-request-id"] == "4bf92f3577b34da6-a3ce"


async def test_no_redirect_carries_the_callers_host() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=5) as client:
        for path in ["/models/", "/admin/endpoints/", "/metrics/", "/healthz/"]:
            answer = await client.get(path, headers={"host": "evil.example"})
            assert answer.status_code == 404 and "location" not in answer.headers, path


async def test_status_routes_need_a_key_and_show_no_process_details() -> None:
    async with serve(CONFIG) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=5) as client:
        await victim(served)
        for path in ["/models", "/models/tiny/a"]:
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers={"authorization": "Bearer no"})
                    ).status_code == 401
        auth = {"authorization": f"Bearer {KEY}"}
        listing = (await client.get("/models", headers=auth)).json()
        one = (await client.get("/models/tiny/a", headers=auth)).json()
        for status in [*listing["endpoints"], one]:
            assert "runner" not in status and "pending_runner" not in status
        assert one["state"] == "ready"
        admin = (await client.get("/admin/endpoints",
                                  headers={"authorization": f"Bearer {ADMIN}"})).json()
        runner = next(e for e in admin["endpoints"] if e["alias"] == "a")["runner"]
        # The runner listens on a socket in a directory only the gateway's user can enter,
        # and on no TCP port.
        assert runner["port"] is None and runner["pid"]
        folder = os.path.dirname(runner["unix_socket"])
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(runner["unix_socket"]).st_mode)

"""RunnerClient against tiny scripted HTTP servers: what end-to-end tests cannot reach."""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from runners.client import RunnerClient
from runners.errors import ConnectError, ReadTimeout, RemoteProtocolError, ServerDisconnected

pytestmark = pytest.mark.anyio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


class Scripted:
    """A server on a free port (or an abstract unix socket) that runs ``script`` for each
    connection; counts connections and keeps what each request sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def tcp(self) -> RunnerClient:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return RunnerClient("127.0.0.1", port)

    async def unix(self) -> RunnerClient:
        path = f"{tempfile.mkdtemp()}/runner.sock"
        self.server = await asyncio.start_unix_server(self._handle, path)
        return RunnerClient("127.0.0.1", None, unix=path)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:  # ends the scripts still reading
            writer.transport.abort()


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


def serving(answers: list[bytes], *, close_after: bool = False) -> Callable[[Scripted], Script]:
    """A script that answers each request on a connection with the next of ``answers``."""
    def make(server: Scripted) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                await server.read_request(reader)
                writer.write(answer)
                await writer.drain()
            if not close_after:
                await reader.read()  # keep the connection until the client drops it
        return script
    return make


_started: list[tuple[Scripted, RunnerClient]] = []


@pytest.fixture(autouse=True)
async def _close_servers() -> AsyncIterator[None]:
    """Servers and clients are closed after each test, passed or failed: a server left
    open would keep the event loop from closing."""
    yield
    while _started:
        server, client = _started.pop()
        client.close()
        server.close()


async def start(make: Callable[[Scripted], Script], *, unix: bool = False
                ) -> tuple[Scripted, RunnerClient]:
    server = Scripted(lambda r, w: asyncio.sleep(0))
    server.script = make(server)
    client = await (server.unix() if unix else server.tcp())
    _started.append((server, client))
    return server, client


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "abstract-unix"])
async def test_answers_over_one_keep_alive_connection(unix: bool) -> None:
    server, client = await start(serving([OK, OK, OK]), unix=unix)
    for _ in range(3):
        assert await client.request("GET", "/ping", timeout=5) == (200, b"ok")
    assert server.connections == 1
    first = server.requests[0]
    host = b"\r\nhost: 127.0.0.1\r\n" if unix else b"\r\nhost: 127.0.0.1:%d\r\n" % client.port
    assert first.startswith(b"GET /ping HTTP/1.1\r\n") and host in first


async def test_interim_answers_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    server, client = await start(serving([interim + OK, OK]))
    status, body = await client.request("POST", "/invocations", body=b"{}", timeout=5)
    assert (status, body) == (200, b"ok")
    assert await client.request("GET", "/ping", timeout=5) == (200, b"ok")  # still in step
    assert server.connections == 1


async def test_an_answer_framed_by_connection_close() -> None:
    unframed = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe whole body"
    _server, client = await start(serving([unframed], close_after=True))
    assert await client.request("GET", "/version", timeout=5) == (200, b"the whole body")
    assert client.take() is None  # never reused: the runner closed it


async def test_a_chunked_answer_streams_in_order() -> None:
    chunks = [b"a" * 5000, b"b" * 70000, b"c"]
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
    server, client = await start(serving([chunked, OK]))
    response = await client.exchange(_request("GET", "/x"), b"", time.monotonic() + 5)
    async with response:
        assert response.status == 200 and not response.has_length
        assert b"".join([c async for c in response.iter_body(5)]) == b"".join(chunks)
    assert (b"transfer-encoding", b"chunked") not in response.headers  # hop-by-hop dropped
    assert await client.request("GET", "/ping", timeout=5) == (200, b"ok")
    assert server.connections == 1


async def test_a_malformed_answer_is_a_protocol_error() -> None:
    _server, client = await start(serving([b"HTTP/1.1 2x0 Nope\r\n\r\n"]))
    with pytest.raises(RemoteProtocolError, match="malformed answer"):
        await client.request("GET", "/ping", timeout=5)
    assert client.take() is None


async def test_a_truncated_answer_is_a_disconnect() -> None:
    short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    _server, client = await start(serving([short], close_after=True))
    with pytest.raises(ServerDisconnected):
        await client.request("GET", "/ping", timeout=5)


async def test_a_runner_that_resets_mid_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 300000)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server, client = await start(lambda s: script)
    response = await client.exchange(_request("GET", "/big"), b"", time.monotonic() + 5)
    received = 0
    with pytest.raises(ServerDisconnected):
        async with response:  # streaming: the head arrived, the body breaks off
            assert not response.complete
            async for chunk in response.iter_body(5):
                received += len(chunk)
    assert 0 < received < 10000000
    assert client.take() is None  # the broken connection is not kept


async def test_no_answer_in_time_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server, client = await start(lambda s: silent)
    began = time.monotonic()
    with pytest.raises(ReadTimeout):
        await client.request("GET", "/ping", timeout=0.3)
    assert time.monotonic() - began < 2


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        await RunnerClient("127.0.0.1", port).request("GET", "/ping", timeout=2)
    with pytest.raises(ConnectError, match=r"/nowhere/runner\.sock"):
        await RunnerClient("127.0.0.1", None, unix="/nowhere/runner.sock").request(
            "GET", "/ping", timeout=2)


async def test_a_kept_connection_the_runner_closed_is_replaced_once() -> None:
    # The runner answers, then closes the idle connection (its keep-alive timeout).
    server, client = await start(serving([OK], close_after=True))
    assert await client.request("GET", "/ping", timeout=5) == (200, b"ok")
    await asyncio.sleep(0.1)
    assert await client.request("POST", "/invocations", body=b"{}", timeout=5) == (200, b"ok")
    assert server.connections == 2


async def test_a_streamed_request_body_goes_chunked() -> None:
    server, client = await start(serving([OK]))

    async def body() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    request = _request("POST", "/invocations", content_length=None)
    response = await client.exchange(request, body(), time.monotonic() + 5)
    async with response:
        assert response.read_buffered() == b"ok"
    sent = server.requests[0]
    assert b"transfer-encoding: chunked" in sent


async def test_head_answers_have_no_body_and_end_the_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    _server, client = await start(serving([head, OK]))
    async with await client.exchange(_request("HEAD", "/ping"), b"",
                                     time.monotonic() + 5) as response:
        assert response.complete and response.read_buffered() == b""
    assert client.take() is None  # a HEAD answer leaves the parser unsure: not reused


class _Req:
    def __init__(self, method: str, path: str, content_length: int | None) -> None:
        self.method = method
        self.head = f"{method} {path} HTTP/1.1\r\n".encode()
        self.content_length = content_length


def _request(method: str, path: str, content_length: int | None = 0) -> _Req:
    return _Req(method, path, content_length)

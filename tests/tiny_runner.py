"""A tiny HTTP/1.1 server standing in for a runner in the fast tests: no MLflow.

    python tests/tiny_runner.py [--port P] [--unix-socket PATH]

It answers ``GET /ping`` (200), ``GET /health`` and ``GET /version``, and echoes
``POST /invocations``: ``{"body": <the request body>, "headers": {<lower-case name>:
<value>}}``. Query parameters shape the answer, so tests can reach every path of the
gateway: ``status=N``, ``sleep=S`` (seconds before answering), ``size=N`` (a body of N
bytes instead of the echo), ``chunked=1`` (chunked framing), ``close=1`` (no framing:
the answer ends when the connection closes), ``crash=1`` (the process exits at once).
A model URI named ``predict…`` makes it answer predictions instead of the echo
(see ``read_model``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httptools

if TYPE_CHECKING:
    from runners.launch import LaunchSpec


class Exchange(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str], bytes]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.queue.put_nowait((method, self.url.decode(), self.headers, bytes(self.body)))

    async def serve(self) -> None:  # answers in order, one at a time, like uvicorn
        while True:
            method, url, headers, body = await self.queue.get()
            await self.answer(method, url, headers, body)

    async def answer(self, method: str, url: str, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if "crash" in query:
            os._exit(3)
        if "sleep" in query:
            await asyncio.sleep(float(query["sleep"]))
        status = int(query.get("status", "200"))
        if parts.path == "/ping":
            payload = b"\n"
        elif parts.path in ("/health", "/version"):
            payload = b"1.0"
        elif parts.path == "/invocations" and method == "POST" and MODEL.get("predict"):
            status, payload = await predict(body)
        elif parts.path == "/invocations" and method == "POST":
            payload = json.dumps({"body": body.decode("latin-1"), "headers": headers}).encode()
        else:
            status, payload = 404, b'{"error": "no such route"}'
        if "size" in query:
            payload = b"x" * int(query["size"])
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nserver: tiny\r\n"
        if "close" in query:
            self.transport.write(head.encode() + b"\r\n" + payload)
            self.transport.close()
            return
        if "chunked" in query:
            chunks = [payload[i:i + 1000] for i in range(0, len(payload), 1000)]
            self.transport.write(head.encode() + b"transfer-encoding: chunked\r\n\r\n"
                                 + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
                                 + b"0\r\n\r\n")
            return
        data = head.encode() + b"content-length: %d\r\n\r\n" % len(payload)
        self.transport.write(data + (b"" if method == "HEAD" else payload))


# A model URI whose last part starts with "predict" makes the runner answer like an MLflow
# model: {"inputs": [[...], ...]} → {"predictions": [sum(row) + plus, ...]}. Further parts,
# dash-separated: plusX (added to each prediction), sleepS (seconds before answering),
# fail (answer 500).
MODEL: dict[str, float] = {}


def read_model(uri: str | None) -> dict[str, float]:
    name = (uri or "").rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("predict"):
        return {}
    model = {"predict": 1.0}
    for part in name.split("-")[1:]:
        for key in ("plus", "sleep", "fail"):
            if part.startswith(key):
                model[key] = float(part[len(key):] or 1)
    return model


async def predict(body: bytes) -> tuple[int, bytes]:
    if MODEL.get("sleep"):
        await asyncio.sleep(MODEL["sleep"])
    if MODEL.get("fail"):
        return 500, b'{"error_code": "INTERNAL_ERROR", "message": "failing on purpose"}'
    try:
        rows = json.loads(body)["inputs"]
        predictions = [sum(row) + MODEL.get("plus", 0.0) for row in rows]
    except (ValueError, KeyError, TypeError):
        return 400, b'{"error_code": "BAD_REQUEST", "message": "expected inputs"}'
    return 200, json.dumps({"predictions": predictions}).encode()


async def main(port: int | None, path: str | None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    if port is not None:
        servers.append(await loop.create_server(Exchange, "127.0.0.1", port))
    if path:
        servers.append(await loop.create_unix_server(Exchange, path))
    print(f"tiny runner serving on {path or port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


async def fork(spec: LaunchSpec) -> asyncio.subprocess.Process:
    """A launcher for the pool's ``fork`` hook: this server in a process of its own group,
    started as the pool starts every runner (``runners.process.spawn``)."""
    from runners.process import spawn

    return await spawn([sys.executable, __file__, *spec.serve_options().argv()], dict(spec.env))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--unix-socket")
    parser.add_argument("--model-uri")  # what runners.serve takes; ignored here
    parser.add_argument("--title")
    args, _ = parser.parse_known_args()
    MODEL.update(read_model(args.model_uri))
    try:
        asyncio.run(main(args.port, args.unix_socket))
    except KeyboardInterrupt:
        sys.exit(0)


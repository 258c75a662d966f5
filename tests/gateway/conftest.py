"""An in-process gateway on a free port whose runners are tiny HTTP servers (no MLflow).

The gateway is the real one (app, proxy, server protocol, runner pool, watchdog), served
by uvicorn in the test's event loop; only the fork launcher's processes come from
``tests/tiny_runner.py`` instead of the zygote.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.protocol import GatewayHttpProtocol
from tests import tiny_runner
from tests.conftest import owned_processes


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@dataclass
class Served:
    gateway: Gateway
    port: int
    owner: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def raw(self, data: bytes, *, until_closed: bool = True, timeout: float = 10
                  ) -> bytes:
        """Send ``data`` on a new connection; what comes back until the gateway closes it
        (or, with ``until_closed=False``, the first read)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(timeout):
                return await (reader.read() if until_closed else reader.read(65536))
        finally:
            writer.close()


ENDPOINTS = [{"name": "tiny", "alias": "a", "model_uri": "/models/tiny-a"},
             {"name": "tiny", "alias": "b", "model_uri": "/models/tiny-b"}]


@contextlib.asynccontextmanager
async def serve(config: dict[str, Any] | None = None, *, fast: bool = True
                ) -> AsyncIterator[Served]:
    """The gateway of ``config`` (endpoints default to two tiny ones), served until the
    block ends; then no process it started may be left."""
    config = {"endpoints": ENDPOINTS, **(config or {})}
    owner = f"fast-test-{uuid.uuid4().hex[:12]}"
    # From a file, as `model-gateway serve` is: an admin config reload re-reads it.
    config_path = Path(tempfile.mkdtemp(prefix="fast-gateway-")) / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    gateway = Gateway(parse_config(config_path.read_text()), owner=owner,
                      config_path=str(config_path), fork=tiny_runner.fork)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(
        gateway.proxy, lifespan="on", loop="none", ws="none", log_config=None,
        access_log=False, proxy_headers=False, server_header=False,
        http=GatewayHttpProtocol if fast else "httptools"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the gateway stopped while starting")
                await asyncio.sleep(0.01)
        yield Served(gateway, sock.getsockname()[1], owner)
    finally:
        server.should_exit = True
        await task
        sock.close()
        shutil.rmtree(config_path.parent, ignore_errors=True)
    assert owned_processes(owner) == []

"""Replicas that switch together: what one gateway learns, it relays to its peers.

A registry webhook reaches one replica; once it has verified the delivery it relays a
``refresh`` of that model to every peer (``peers.addresses``, and every A record of
``peers.dns``), and each peer re-resolves at once instead of at its next poll. An admin
reload with ``?all=true`` is relayed the same way. Relays are signed with the peer
secret (HMAC-SHA256 over ``"<timestamp>.<nonce>.<body>"``), refused when stale or
replayed, and never relayed again. Each peer is called on its own task with a short
deadline: a peer that is down or slow delays neither the webhook's answer nor the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cachetools import TTLCache

from .webhooks import MAX_AGE, WebhookRejected

log = logging.getLogger("model_gateway.peers")

SIGNATURE = "x-model-gateway-peer-signature"  # "t=<unix>,n=<nonce>,v1=<hex>"
RELAY_PATH = "/peers/relay"
RELAY_TIMEOUT = 2.0  # seconds per peer: connect, send, and read the status line
ACTIONS = ("refresh", "reload")


@dataclass(frozen=True)
class PeerMessage:
    action: str  # refresh: re-resolve ``model`` (every endpoint when None); reload: config
    model: str | None
    origin: str  # the relaying gateway's instance id


def sign(secret: str, stamp: str, nonce: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{stamp}.{nonce}.".encode() + body, hashlib.sha256)
    return f"t={stamp},n={nonce},v1={digest.hexdigest()}"


class PeerVerifier:
    """Checks one relay; remembers nonces for twice the allowed age."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=2 * MAX_AGE)

    def verify(self, header: str | None, body: bytes, now: float | None = None) -> PeerMessage:
        fields = dict(part.split("=", 1) for part in (header or "").split(",") if "=" in part)
        stamp, nonce, sent = fields.get("t", ""), fields.get("n", ""), fields.get("v1", "")
        if not (stamp and nonce and sent):
            raise WebhookRejected(401, "signature_missing", "signed peer relay expected")
        expected = sign(self.secret, stamp, nonce, body).rsplit("v1=", 1)[1]
        if not hmac.compare_digest(expected, sent):
            raise WebhookRejected(401, "signature_invalid", "peer signature does not match")
        try:
            age = (time.time() if now is None else now) - float(stamp)
        except ValueError:
            raise WebhookRejected(401, "timestamp_invalid", "bad relay timestamp") from None
        if abs(age) > MAX_AGE:
            raise WebhookRejected(401, "timestamp_stale", "relay timestamp outside 5 minutes")
        if nonce in self._seen:
            raise WebhookRejected(409, "relay_replayed", "relay already processed")
        self._seen[nonce] = True
        try:
            payload = json.loads(body)
            action, model = payload["action"], payload.get("model")
            if action not in ACTIONS or not (model is None or isinstance(model, str)):
                raise ValueError(action)
            return PeerMessage(action, model, str(payload.get("origin", "")))
        except (ValueError, KeyError, TypeError):
            raise WebhookRejected(400, "payload_invalid", "not a peer relay") from None


def own_hosts(bind_host: str) -> set[str]:
    """Names and addresses under which this host may appear in its own peer list."""
    hosts = {bind_host, "localhost", "127.0.0.1", "::1", socket.gethostname()}
    try:
        hosts |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return hosts


class Peers:
    """Finds the other replicas and relays to them. ``port``: this gateway's own."""

    def __init__(self, addresses: list[str], dns: str | None, secret: str, port: int,
                 hosts: set[str], instance: str,
                 on_result: Callable[[str], None] | None = None) -> None:
        self.addresses = addresses
        self.dns = dns
        self.secret = secret
        self.port = port
        self.hosts = hosts
        self.instance = instance  # a relay that comes back to this process is ignored
        self.on_result = on_result or (lambda result: None)
        self._tasks: set[asyncio.Task[None]] = set()

    def _own(self, host: str, port: int) -> bool:
        return port == self.port and host in self.hosts

    async def targets(self) -> list[tuple[str, int]]:
        """Every peer's (host, port), this gateway's own address left out."""
        found: list[tuple[str, int]] = []
        for address in self.addresses:
            parts = urlsplit(address)
            found.append((parts.hostname or "", parts.port or 80))
        if self.dns:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    self.dns, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("peers: %s does not resolve: %s", self.dns, exc)
                infos = []
            found += [(str(info[4][0]), self.port) for info in infos]
        return [t for t in dict.fromkeys(found) if not self._own(*t)]

    def relay(self, action: str, model: str | None) -> None:
        """Start relaying; returns at once. Each peer is called on a task of its own."""
        body = json.dumps({"action": action, "model": model, "origin": self.instance}).encode()
        task = asyncio.get_running_loop().create_task(self._relay_all(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay_all(self, body: bytes) -> None:
        targets = await self.targets()
        await asyncio.gather(*(self._relay_one(host, port, body) for host, port in targets))

    async def _relay_one(self, host: str, port: int, body: bytes) -> None:
        stamp, nonce = str(int(time.time())), uuid.uuid4().hex
        head = (f"POST {RELAY_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{SIGNATURE}: {sign(self.secret, stamp, nonce, body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        writer = None
        try:
            async with asyncio.timeout(RELAY_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(head + body)
                status_line = await reader.readline()
            status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.") else 0
            result = "ok" if 200 <= status < 300 else "refused"
            if result != "ok":
                log.warning("peer %s:%d refused a relay: %r", host, port, status_line[:80])
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            result = "failed"
            log.warning("peer %s:%d not reached: %s", host, port, exc or type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
        self.on_result(result)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

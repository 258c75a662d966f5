"""Peer relays (fast tier): signatures, config, finding peers, and a relay between two
in-process gateways that a dead or silent peer does not delay."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import ConfigError, parse_config
from gateway.peers import SIGNATURE, Peers, PeerVerifier, own_hosts, sign
from gateway.webhooks import WebhookRejected, signature
from tests.gateway.conftest import Served, serve

SECRET = "peer-secret-of-the-tests"


def relay_body(action: str = "refresh", model: str | None = "churn") -> bytes:
    return json.dumps({"action": action, "model": model, "origin": "elsewhere"}).encode()


def test_a_relay_is_signed_fresh_and_used_once() -> None:
    verifier, body = PeerVerifier(SECRET), relay_body()
    stamp, nonce = str(int(time.time())), uuid.uuid4().hex
    message = verifier.verify(sign(SECRET, stamp, nonce, body), body)
    assert (message.action, message.model, message.origin) == ("refresh", "churn", "elsewhere")
    cases = [
        (None, body, "signature_missing"),
        (sign("another-secret", stamp, uuid.uuid4().hex, body), body, "signature_invalid"),
        (sign(SECRET, stamp, nonce, body), body, "relay_replayed"),
        (sign(SECRET, str(int(time.time()) - 900), "n2", body), body, "timestamp_stale"),
        (sign(SECRET, stamp, "n3", b'{"action": "rm -rf"}'), b'{"action": "rm -rf"}',
         "payload_invalid"),
    ]
    tampered = sign(SECRET, stamp, "n4", body)
    cases.append((tampered, body + b" ", "signature_invalid"))
    for header, sent, code in cases:
        with pytest.raises(WebhookRejected) as caught:
            verifier.verify(header, sent)
        assert caught.value.code == code


def test_peer_addresses_are_plain_base_urls_and_the_secret_defaults() -> None:
    with pytest.raises(ConfigError, match=r"peers\.addresses\[0\]: .*expected http://host:port"):
        parse_config("webhook_secret: s\npeers: {addresses: ['http://h:1/path']}\n")
    config = parse_config("webhook_secret: s\npeers: {dns: gw-headless.team.svc}\n")
    assert config.peers.enabled and config.peer_secret == "s"
    config = parse_config("webhook_secret: s\npeers: {addresses: [http://a:1], secret: p}\n")
    assert config.peer_secret == "p"


@pytest.mark.anyio
async def test_its_own_address_is_left_out_and_dns_names_every_record() -> None:
    hosts = own_hosts("127.0.0.1")
    peers = Peers(["http://127.0.0.1:8080", "http://localhost:8080", "http://127.0.0.1:8081",
                   "http://10.1.2.3:8080"], None, SECRET, 8080, hosts, "me")
    assert await peers.targets() == [("127.0.0.1", 8081), ("10.1.2.3", 8080)]
    assert await Peers([], "localhost", SECRET, 8080, hosts, "me").targets() == []
    assert await Peers([], "localhost", SECRET, 8080, {"10.9.9.9"}, "me").targets() == [
        ("127.0.0.1", 8080)]


def webhook(model: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": model, "alias": "a", "version": "2"}}).encode()
    delivery, stamp = uuid.uuid4().hex, str(int(time.time()))
    return body, {"x-mlflow-delivery-id": delivery, "x-mlflow-timestamp": stamp,
                  "x-mlflow-signature": signature(SECRET, delivery, stamp, body)}


def relays(served: Served, direction: str, result: str) -> float:
    return float(served.gateway.metrics.peer_relays.labels(direction, result)._value.get())


@pytest.mark.anyio
async def test_a_webhook_is_relayed_and_a_silent_peer_delays_nothing() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing: a hung peer

    blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
    hole = blackhole.sockets[0].getsockname()[1]
    async with serve({"webhook_secret": SECRET}) as b:
        peers = {"addresses": [b.url, f"http://127.0.0.1:{hole}", "http://127.0.0.1:9"]}
        async with serve({"webhook_secret": SECRET, "peers": peers}) as a, \
                httpx.AsyncClient(base_url=a.url) as client:
            body, headers = webhook("tiny")
            answer = await client.post("/hooks/mlflow", content=body, headers=headers)
            assert answer.status_code == 200
            # Answered while the hung peer still holds its relay (it fails after 2 s).
            assert relays(a, "sent", "failed") <= 1
            async with asyncio.timeout(10):
                while relays(b, "received", "accepted") < 1 or relays(a, "sent", "failed") < 2:
                    await asyncio.sleep(0.05)
            assert relays(a, "sent", "ok") == 1  # b; the hung and the refused peer failed
            # An outsider cannot use the relay.
            forged = await client.post(f"{b.url}/peers/relay", content=relay_body(),
                                       headers={SIGNATURE: sign("guess", "1", "n", b"x")})
            assert forged.status_code == 401
            assert relays(b, "received", "rejected") == 1
    blackhole.close()
    for writer in accepted:
        writer.close()


@pytest.mark.anyio
async def test_without_a_secret_nothing_is_relayed_and_the_relay_route_is_off() -> None:
    config = {"peers": {"addresses": ["http://127.0.0.1:9"]}}  # no secret to sign with
    async with serve(config) as served, httpx.AsyncClient(base_url=served.url) as client:
        assert served.gateway.peers is None and served.gateway.relay("refresh", "m") is False
        answer = await client.post("/peers/relay", content=relay_body())
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "peers_disabled"


@pytest.mark.anyio
async def test_admin_reloads_with_all_reach_the_peers() -> None:
    admin = {"authorization": "Bearer admin-of-peer-tests"}
    async with serve({"webhook_secret": SECRET}) as b:
        config = {"webhook_secret": SECRET, "peers": {"addresses": [b.url]},
                  "auth": {"admin_tokens": ["admin-of-peer-tests"]}}
        async with serve(config) as a, httpx.AsyncClient(base_url=a.url) as client:
            one = await client.post("/admin/endpoints/tiny/a/reload?all=true", headers=admin)
            assert one.status_code == 202 and one.json()["relayed_to_peers"] is True
            alone = await client.post("/admin/endpoints/tiny/a/reload", headers=admin)
            assert alone.json()["relayed_to_peers"] is False
            # b's file gains an endpoint; a's config reload with ?all=true has b reload it.
            path = Path(b.gateway.reloader.config_path or "")
            text = yaml.safe_load(path.read_text())
            text["endpoints"].append({"name": "tiny", "alias": "c", "model_uri": "/m/c"})
            path.write_text(yaml.safe_dump(text))
            everyone = await client.post("/admin/config/reload?all=true", headers=admin)
            assert everyone.status_code == 200 and everyone.json()["relayed_to_peers"] is True
            async with asyncio.timeout(10):
                while ("tiny", "c") not in b.gateway.pool.endpoints:
                    await asyncio.sleep(0.05)
            assert relays(b, "received", "accepted") == 2
            assert ("tiny", "c") not in a.gateway.pool.endpoints  # a's own file is unchanged

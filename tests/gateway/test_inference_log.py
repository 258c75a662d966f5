"""The inference log (fast tier: tiny runners that answer predictions, over HTTP)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from tests.gateway.conftest import serve

pytestmark = pytest.mark.anyio

BODY = b'{"inputs": [[1.0, 2.0]]}'


def _lines(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.parent.glob(path.name + "*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


async def _predict(client: httpx.AsyncClient, path: str, count: int,
                   body: bytes = BODY) -> None:
    async def one() -> None:
        answer = await client.post(path, content=body,
                                   headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text

    for _ in range(count // 8):
        await asyncio.gather(*(one() for _ in range(8)))


async def test_every_line_names_what_answered_and_the_bodies(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "inference.jsonl"
    config = {"defaults": {"inference_log": {"path": str(log), "max_body": "1KiB"}},
              "endpoints": [
                  {"name": "m", "alias": "a", "model_uri": "/models/predict"},
                  {"name": "m", "alias": "b", "model_uri": "/models/predict-plus1",
                   "inference_log": False},
                  {"name": "m", "alias": "live", "traffic": {"a": 1}},
                  {"name": "m", "alias": "s", "model_uri": "/models/predict",
                   "shadow": {"to": "b"}}]}
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        await _predict(client, "/models/m/a/invocations", 16)
        await _predict(client, "/models/m/live/invocations", 8)
        await _predict(client, "/models/m/b/invocations", 8)  # not logged
        big = json.dumps({"inputs": [[1.0] * 400]}).encode()  # past max_body
        await _predict(client, "/models/m/a/invocations", 8, big)
        await _predict(client, "/models/m/s/invocations", 8)
        for _ in range(100):  # the shadow's comparisons arrive after their answers
            if sum(1 for line in _lines(log) if "shadow" in line) == 8:
                break
            await asyncio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
    lines = _lines(log)  # the gateway has stopped: everything buffered was written
    answers = [line for line in lines if "shadow" not in line]
    assert len(answers) == 16 + 8 + 8 + 8
    first = answers[0]
    assert first["endpoint"] == "m/a" and first["route"] is None and first["status"] == 200
    assert first["request"] == {"inputs": [[1.0, 2.0]]}
    assert first["response"] == {"predictions": [3.0]}
    assert first["version"] is None and first["model_uri"] == "/models/predict"
    assert len(first["request_id"]) == 32 and first["latency_ms"] > 0
    assert sum(1 for line in answers if line["route"] == "m/live") == 8
    assert not any(line["endpoint"] == "m/b" for line in answers)
    sized = [line for line in answers if line["request"] == {"bytes": len(big)}]
    assert len(sized) == 8 and sized[0]["response"] == {"predictions": [400.0]}
    shadows = [line for line in lines if "shadow" in line]
    assert len(shadows) == 8 and {line["outcome"] for line in shadows} == {"mismatch"}
    assert {line["request_id"] for line in shadows} <= {line["request_id"] for line in answers}
    # Scraped once the shadows' lines were in the file: every line had been written.
    assert 'model_gateway_inference_log_lines_total{result="written"} 48.0' in metrics


async def test_a_share_is_sampled_and_files_rotate_by_size(tmp_path: Path) -> None:
    log = tmp_path / "inference.jsonl"
    config = {"endpoints": [{"name": "m", "alias": "a", "model_uri": "/models/predict",
                             "inference_log": {"path": str(log), "sample": "25%",
                                               "max_file_size": 4096, "keep": 2}}]}
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        for _ in range(4):
            await _predict(client, "/models/m/a/invocations", 96)
            await asyncio.sleep(0.1)  # the writer takes a batch: files rotate between them
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["inference.jsonl", "inference.jsonl.1", "inference.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    # 25 % of 384 is 96 lines; the two rotated files keep only the newest of them.
    assert 0 < len(_lines(log)) < 96


async def test_a_log_that_cannot_be_written_drops_lines_and_serves_on(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the log's directory should be")
    config = {"endpoints": [{"name": "m", "alias": "a", "model_uri": "/models/predict",
                             "inference_log": {"path": str(tmp_path / "not-a-dir" / "x")}}]}
    async with serve(config) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        await _predict(client, "/models/m/a/invocations", 16)
        for _ in range(100):
            metrics = (await client.get("/metrics")).text
            if 'model_gateway_inference_log_lines_total{result="dropped"} 16.0' in metrics:
                break
            await asyncio.sleep(0.05)
        assert 'model_gateway_inference_log_lines_total{result="dropped"} 16.0' in metrics
        assert (await client.get("/healthz")).status_code == 200


def test_one_file_one_size_and_keep() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("""
defaults: {inference_log: {path: /tmp/x.jsonl}}
endpoints:
  - {name: m, alias: a, model_uri: /a}
  - {name: m, alias: b, model_uri: /b, inference_log: {path: /tmp/x.jsonl, keep: 1}}
""")
    assert "endpoints[1].inference_log: /tmp/x.jsonl is also written by endpoints[0] " \
           "with another max_file_size or keep" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config("endpoints: [{name: m, alias: c, model_uri: /c, "
                     "inference_log: {sample: 5%}}]")
    assert "endpoints[0].inference_log: path is required" in str(caught.value)

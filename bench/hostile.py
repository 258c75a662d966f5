"""Hostile clients: a well-behaved client's latency while slow and deaf clients are open.

    .venv/bin/python bench/hostile.py [--duration 60] [--slow 1000] [--deaf 100]

A gateway with the default limits serves two models of a temporary registry: ``const``
(a scikit-learn model, what the victim calls) and ``blob`` (a pyfunc whose answers are
large and cheap: ``size`` characters per row). A well-behaved client (wrk, 1 connection,
1-row predictions of ``const``) is measured alone, then again while an attacker process
keeps ``--slow`` connections sending a request head one header line a second (they never
finish it; the attacker opens another whenever the gateway closes one) and ``--deaf``
connections that pipeline requests for large ``blob`` answers and never read (each is
opened once). Reported: the victim's p50/p99 alone and under attack, the gateway's memory
(RSS) idle and at its peak, how many attacking connections the gateway closed and after
how long (header_timeout, send_timeout), and the edge's refusal counters from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
    GatewayService,
    Load,
    Options,
    add_options,
    ensure_tools,
    exit_on_sigterm,
    http,
    markdown_table,
    options_from,
    run_wrk,
    save_result,
    stage,
)
from bench.probes import by_label, memory, mib, scrape, write_config
from bench.registry import constant_registry, log_code_model

SLOW, DEAF = 1000, 100
BODY = b'{"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}'
BLOB = 200_000  # characters of one deaf request's answer
DEAF_PIPELINE = 50  # 10 MB of answers per deaf client: past the kernel's buffers


# -- the attacker process -----------------------------------------------------------------
async def _slow(port: int, stop: float, lifetimes: list[float]) -> None:
    """One slow-header client, reconnecting whenever the gateway drops it."""
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        writer.write(b"POST /models/const/victim/invocations HTTP/1.1\r\nhost: b\r\n")
        with contextlib.suppress(OSError):
            while time.monotonic() < stop:
                try:
                    await asyncio.wait_for(reader.read(1024), 1.0)
                    break  # answered (408) or closed
                except TimeoutError:
                    writer.write(b"x-slow: 1\r\n")
            else:
                writer.close()
                return
        lifetimes.append(time.monotonic() - opened)
        writer.close()


async def _deaf(port: int, stop: float, lifetimes: list[float]) -> None:
    """One client that pipelines requests for large answers and never reads them."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"dataframe_split": {"columns": ["size"], "data": [[BLOB]]}}).encode()
    request = (b"POST /models/blob/main/invocations HTTP/1.1\r\nhost: b\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
               + body)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        return
    opened = time.monotonic()
    try:
        # The gateway stops reading once its answers pile up: sending may block then.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(sock, request * DEAF_PIPELINE),
                                   max(stop - time.monotonic(), 0.1))
        while time.monotonic() < stop and not _reset(sock):
            await asyncio.sleep(0.5)
    except OSError:
        pass  # reset while sending: dropped
    if time.monotonic() < stop:
        lifetimes.append(time.monotonic() - opened)
    sock.close()


TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux tcp_states.h


def _reset(sock: socket.socket) -> bool:
    """Whether the gateway dropped the connection, without reading any of the data waiting
    in the socket: an error pending (a reset), or the gateway's FIN received (the socket
    is in CLOSE_WAIT; TCP_INFO's first byte is the state)."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
        return True
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] in (TCP_CLOSE,
                                                                           TCP_CLOSE_WAIT)


async def attack(port: int, slow: int, deaf: int, seconds: float) -> dict[str, list[float]]:
    stop = time.monotonic() + seconds
    slow_lives: list[float] = []
    deaf_lives: list[float] = []
    tasks = [_slow(port, stop, slow_lives) for _ in range(slow)]
    tasks += [_deaf(port, stop, deaf_lives) for _ in range(deaf)]
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"slow": slow_lives, "deaf": deaf_lives}


# -- the section --------------------------------------------------------------------------
class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, memory(self.pid).rss)


def run(options: Options, *, slow: int = SLOW, deaf: int = DEAF) -> str:
    ensure_tools({"wrk": "wrk"})
    seconds = options.duration
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hostile-")))
        with stage("building the registry (const, blob)"):
            uri, _ = constant_registry(work, "bench-hostile", ["const"], (1.0,))
            import pandas as pd

            log_code_model(work, "bench-hostile", "blob", ROOT / "bench" / "models" / "blob.py",
                           pd.DataFrame({"size": [1]}))
        config = write_config(work / "gateway.yaml", {"tracking_uri": uri, "endpoints": [
            {"name": "const", "alias": "victim", "model_uri": "models:/const/1", "preload": True},
            {"name": "blob", "alias": "main", "model_uri": "models:/blob/1", "preload": True}]})
        with stage("starting the gateway"):
            gateway = stack.enter_context(GatewayService(config, work / "gateway.log"))
        url = f"{gateway.url}/models/const/victim/invocations"
        status, answer = http(url, method="POST", body=BODY)
        if status != 200:
            raise RuntimeError(f"the victim's first prediction answered {status}: {answer!r}")
        load = Load("POST", BODY)
        with stage(f"the victim alone, {seconds:.0f}s"):
            alone = run_wrk(url, load, duration=seconds, connections=1, threads=1,
                            script_dir=work)
        idle = memory(gateway.pid).rss
        sampler = RssSampler(gateway.pid)
        sampler.start()
        out = work / "attack.json"
        with stage(f"the victim beside {slow} slow and {deaf} deaf clients, {seconds:.0f}s"):
            attacker = subprocess.Popen(
                [sys.executable, __file__, "--attack", str(gateway.port), "--slow", str(slow),
                 "--deaf", str(deaf), "--seconds", str(seconds + 15), "--out", str(out)],
                cwd=ROOT)
            time.sleep(10)  # every attacking connection open before the measurement
            attacked = run_wrk(url, load, duration=seconds, connections=1, threads=1,
                               script_dir=work)
            attacker.wait(seconds + 120)
        sampler.stopped.set()
        sampler.join()
        lives = json.loads(out.read_text())
        refusals = by_label(scrape(gateway.url), "model_gateway_client_errors_total", "reason")
        gateway.check_alive()
    return render(options, slow, deaf, alone, attacked, idle, sampler.peak, lives, refusals)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "—"


def render(options: Options, slow: int, deaf: int, alone: object, attacked: object, idle: int,
           peak: int, lives: dict[str, list[float]], refusals: dict[str, float]) -> str:
    rows = []
    for name, result in (("alone", alone), (f"beside {slow} slow and {deaf} deaf", attacked)):
        r = result  # a WrkResult
        rows.append([name, f"{r.requests:,}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",  # type: ignore[attr-defined]
                     f"{r.errors + r.bad_status}"])  # type: ignore[attr-defined]
    table = markdown_table(["victim (wrk, 1 connection, 1-row predictions)", "requests",
                            "p50 ms", "p99 ms", "errors"], rows)
    text = [f"### Hostile clients — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "", table, "",
            f"Gateway RSS: {mib(idle)} MiB idle, {mib(peak)} MiB at its peak under attack "
            f"(+{mib(peak - idle)} MiB).",
            f"Slow-header connections closed by the gateway: {len(lives['slow']):,}, after "
            f"{_median(lives['slow'])} s (median; header_timeout 10 s).",
            f"Deaf connections dropped: {len(lives['deaf']):,}, after "
            f"{_median(lives['deaf'])} s (median; send_timeout 30 s).",
            "Edge refusals (model_gateway_client_errors_total): "
            + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(refusals.items())) or "none"),
            f"({options.duration:.0f} s per victim run; 2 CPUs, shared.)"]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.add_argument("--slow", type=int, default=SLOW)
    parser.add_argument("--deaf", type=int, default=DEAF)
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)  # the attacker process
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        lives = asyncio.run(attack(args.attack, args.slow, args.deaf, args.seconds))
        Path(args.out).write_text(json.dumps(lives))
        return 0
    exit_on_sigterm()
    options = options_from(args)
    if "--duration" not in (argv or sys.argv):
        options = Options(**{**vars(options), "duration": 30.0})
    report = run(options, slow=args.slow, deaf=args.deaf)
    print(report)
    print(f"saved to {save_result('hostile', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

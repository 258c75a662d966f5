"""Replicas that switch together: a webhook to one of three gateways moves all three.

    .venv/bin/python bench/peers.py [--rounds 10]

A temporary registry (``const`` v1 → 1.0, v2 → 2.0) behind a real ``mlflow server``;
three gateways on loopback, each listing all three as peers (their own address is
skipped), endpoint ``const/peers`` with poll_interval 10 m, webhook_secret set; MLflow's
webhook goes to the first gateway only. Each round moves the alias (v2, v1, …) through the
server and probes the three gateways in parallel (a prediction every 20 ms) until each
answers from the new version. Then the third gateway is stopped and the rounds repeat
with the other two. Reported: seconds from the registry call returning to each gateway's
first answer from the new version (median and worst of all, and of the slowest gateway
per move); the goal is every one within 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cutover import MlflowServer, wait_for_version
from bench.harness import (
    GatewayService,
    Options,
    add_options,
    exit_on_sigterm,
    markdown_table,
    median,
    options_from,
    save_result,
    stage,
)
from bench.probes import write_config
from bench.registry import constant_registry

SECRET = "bench-peers-webhook-secret"
REPLICAS = 3


def run(options: Options) -> str:
    """Run the section; returns its markdown report."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-")))
        with stage("building the registry (const v1, v2)"):
            db_uri, _ = constant_registry(work, "bench-peers", ["const"], (1.0, 2.0))
        from mlflow import MlflowClient

        with stage("starting mlflow server and three gateways"):
            server = stack.enter_context(MlflowServer(db_uri, work / "mlflow-server.log"))
            client = MlflowClient(server.url)
            client.set_registered_model_alias("const", "peers", "1")
            gateways = [GatewayService(work / f"gateway-{i}.yaml", work / f"gateway-{i}.log")
                        for i in range(REPLICAS)]
            peers = {"addresses": [gw.url for gw in gateways]}
            for i, gw in enumerate(gateways):
                write_config(work / f"gateway-{i}.yaml", {
                    "tracking_uri": server.url, "webhook_secret": SECRET, "peers": peers,
                    "access_log": False,
                    "endpoints": [{"name": "const", "alias": "peers", "poll_interval": "10m",
                                   "drain_timeout": "2s"}]})
                stack.enter_context(gw)
        urls = [f"{gw.url}/models/const/peers/invocations" for gw in gateways]
        with stage("warming the three endpoints"):
            for url in urls:
                wait_for_version(url, "1")
        hook = client.create_webhook(name=f"bench-peers-{gateways[0].port}",
                                     url=f"{gateways[0].url}/hooks/mlflow",
                                     events=["model_version_alias.created"], secret=SECRET)
        stack.callback(client.delete_webhook, hook.webhook_id)
        time.sleep(1.5)  # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL

        phases: dict[str, list[list[float]]] = {}
        version = "1"
        for phase, live in (("3 replicas", urls), ("1 of 3 stopped", urls[:2])):
            if len(live) < len(urls):
                gateways[2].stop()
            moves: list[list[float]] = []
            for round_no in range(1, options.rounds + 1):
                version = "2" if version == "1" else "1"
                with stage(f"{phase}: move {round_no}/{options.rounds} → v{version}"):
                    client.set_registered_model_alias("const", "peers", version)
                    with ThreadPoolExecutor(len(live)) as pool:
                        seconds = list(pool.map(
                            lambda url, v=version: wait_for_version(url, v), live))
                    print("    " + "  ".join(f"gw{i}: {s:.2f} s" for i, s in
                                             enumerate(seconds)), file=sys.stderr, flush=True)
                    moves.append(seconds)
            phases[phase] = moves
        with stage("stopping the gateways, their runners and mlflow server"):
            stack.close()
    return render(options, phases)


def render(options: Options, phases: dict[str, list[list[float]]]) -> str:
    header = ["phase", "moves", "median s (all)", "worst s (all)",
              "median s (slowest per move)", "gateway with the webhook, median s",
              "peers, median s", "within 2 s"]
    rows = []
    for phase, moves in phases.items():
        every = [s for move in moves for s in move]
        rows.append([phase, str(len(moves)), f"{median(every):.2f}", f"{max(every):.2f}",
                     f"{median([max(m) for m in moves]):.2f}",
                     f"{median([m[0] for m in moves]):.2f}",
                     f"{median([s for m in moves for s in m[1:]]):.2f}",
                     f"{sum(s <= 2.0 for s in every)}/{len(every)}"])
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return (f"### Replicas that switch together — {when}\n\n"
            f"{REPLICAS} gateways on loopback, one `mlflow server`, poll_interval 10 m, "
            "MLflow's webhook to the first gateway only, which relays it to the others; "
            "seconds from the registry call returning to each gateway's first answer from "
            "the new version (probed every 20 ms). "
            f"{os.cpu_count()} CPUs, shared machine (noise possible).\n\n"
            + markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.set_defaults(rounds=10)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    report = run(options_from(args))
    print(report)
    print(f"saved to {save_result('peers', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Alias cutover under load: from moving an alias to the first answer of the new version.

    .venv/bin/python bench/cutover.py [--rounds 2] [--duration 15] [--connections 16]

Builds a temporary registry (sqlite) with model ``const``: v1 predicts 1.0, v2 predicts
2.0. Two gateways follow it, each with one fork-launched endpoint (drain_timeout 5 s):

    polling  const/live, tracking_uri the sqlite file, poll_interval 1 s; the alias is
             moved with MlflowClient on the sqlite file
    webhook  const/hook, tracking_uri a real ``mlflow server`` over the same file,
             poll_interval 10 m, webhook_secret set and a webhook registered on the
             server for ``model_version_alias.created``; the alias is moved through it

Each round runs wrk (POST invocations) against one endpoint; a third of the way in the
alias is moved to v2, two thirds of the way back to v1, and after each move a prediction
is POSTed every 20 ms until ``X-Model-Version`` is the new version. Modes are
interleaved round after round; medians are reported with wrk's non-2xx answers and
socket errors, which must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    GatewayService,
    Load,
    Options,
    Service,
    WrkResult,
    add_options,
    ensure_tools,
    exit_on_sigterm,
    free_port,
    http,
    markdown_table,
    median,
    options_from,
    run_wrk,
    save_result,
    stage,
    wait_until,
)
from bench.probes import predict, write_config
from bench.registry import constant_registry

BODY = b'{"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}'
SECRET = "bench-cutover-webhook-secret"
MODES = ("polling", "webhook")
PROBE_INTERVAL = 0.02
SWITCH_TIMEOUT = 120.0


@dataclass(frozen=True)
class Switch:
    to: str
    seconds: float  # from the registry call returning to the first answer of ``to``
    call_seconds: float  # how long the registry call itself took


@dataclass
class Round:
    mode: str
    result: WrkResult
    switches: list[Switch]


def build_registry(root: Path) -> str:
    """``const`` v1 → 1.0, v2 → 2.0; aliases ``live`` and ``hook`` → 1. Returns its URI."""
    uri, client = constant_registry(root, "bench-cutover", ["const"], (1.0, 2.0))
    for alias in ("live", "hook"):
        client.set_registered_model_alias("const", alias, "1")
    return uri


class MlflowServer(Service):
    """``mlflow server`` on loopback over an sqlite file, with webhooks to loopback allowed."""

    name = "mlflow server"

    def __init__(self, db_uri: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
               "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
               "_MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
        super().__init__([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                          db_uri, "--host", "127.0.0.1", "--port", str(self.port),
                          "--workers", "1"], log_path, env=env)

    def start(self) -> None:
        super().start()
        try:
            wait_until(self._healthy, 120, "mlflow server /health")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        self.check_alive()
        return http(f"{self.url}/health", timeout=2)[0] == 200


def _gateway_config(work: Path, mode: str, tracking_uri: str) -> Path:
    alias = "live" if mode == "polling" else "hook"
    endpoint = {"name": "const", "alias": alias, "launcher": "fork", "drain_timeout": "5s",
                "poll_interval": "1s" if mode == "polling" else "10m"}
    config = {"tracking_uri": tracking_uri, "access_log": False, "endpoints": [endpoint]}
    if mode == "webhook":
        config["webhook_secret"] = SECRET
    return write_config(work / f"gateway-{mode}.yaml", config)


def wait_for_version(url: str, version: str) -> float:
    """Seconds until a prediction from ``url`` carries ``X-Model-Version: version``."""
    started = time.monotonic()
    while time.monotonic() - started < SWITCH_TIMEOUT:
        status, seen = predict(url, BODY, timeout=30)
        if status == 200 and seen == version:
            return time.monotonic() - started
        time.sleep(PROBE_INTERVAL)
    raise TimeoutError(f"{url} did not answer from version {version} within "
                       f"{SWITCH_TIMEOUT:.0f}s")


def one_round(mode: str, url: str, move: Callable[[str], None], options: Options,
              work: Path) -> Round:
    switches = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        load = pool.submit(run_wrk, url, Load("POST", BODY), duration=options.duration,
                           connections=options.connections, threads=options.threads,
                           script_dir=work)
        for fraction, version in ((1 / 3, "2"), (2 / 3, "1")):
            time.sleep(max(0.0, started + options.duration * fraction - time.monotonic()))
            called = time.monotonic()
            move(version)
            returned = time.monotonic()
            seconds = wait_for_version(url, version)
            switches.append(Switch(version, seconds, returned - called))
            print(f"    {mode:<8} → v{version}: {seconds:5.2f} s after the move "
                  f"(registry call {returned - called:.2f} s)", file=sys.stderr, flush=True)
        result = load.result()
    if result.errors or result.bad_status:
        print(f"    {mode}: wrk saw {result.bad_status} non-2xx and {result.errors} socket "
              "errors", file=sys.stderr, flush=True)
    return Round(mode, result, switches)


def run(options: Options, *, log_level: str = "INFO") -> str:
    """Run the section; returns its markdown report."""
    ensure_tools({"wrk": "wrk"})
    from mlflow import MlflowClient

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cutover-")))
        with stage("building the registry (const v1, v2)"):
            db_uri = build_registry(work)
        with stage("starting mlflow server and two gateways"):
            server = stack.enter_context(MlflowServer(db_uri, work / "mlflow-server.log"))
            gateways = {
                "polling": stack.enter_context(GatewayService(
                    _gateway_config(work, "polling", db_uri), work / "gateway-polling.log",
                    log_level=log_level)),
                "webhook": stack.enter_context(GatewayService(
                    _gateway_config(work, "webhook", server.url), work / "gateway-webhook.log",
                    log_level=log_level)),
            }
        clients = {"polling": MlflowClient(db_uri), "webhook": MlflowClient(server.url)}
        aliases = {"polling": "live", "webhook": "hook"}
        urls = {mode: f"{gw.url}/models/const/{aliases[mode]}/invocations"
                for mode, gw in gateways.items()}
        with stage("warming both endpoints"):
            for url in urls.values():
                wait_for_version(url, "1")
        hook = clients["webhook"].create_webhook(
            name=f"bench-gateway-{gateways['webhook'].port}",
            url=f"{gateways['webhook'].url}/hooks/mlflow",
            events=["model_version_alias.created"], secret=SECRET)
        stack.callback(clients["webhook"].delete_webhook, hook.webhook_id)
        time.sleep(1.5)  # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL

        def mover(mode: str) -> Callable[[str], None]:
            return lambda version: clients[mode].set_registered_model_alias(
                "const", aliases[mode], version)

        rounds: list[Round] = []
        for round_no in range(1, options.rounds + 1):
            with stage(f"round {round_no}/{options.rounds}"):
                for mode in MODES:
                    rounds.append(one_round(mode, urls[mode], mover(mode), options, work))
                    gateways[mode].check_alive()
        with stage("stopping the gateways, their runners and mlflow server"):
            stack.close()
    return render(options, rounds)


def render(options: Options, rounds: list[Round]) -> str:
    header = ["mode", "median s to new version", "min s", "max s",
              "median s from call start", "switches", "median registry call s",
              "wrk requests", "non-2xx", "socket errors"]
    rows = []
    for mode in MODES:
        mine = [r for r in rounds if r.mode == mode]
        switches = [s for r in mine for s in r.switches]
        seconds = [s.seconds for s in switches]
        rows.append([mode, f"{median(seconds):.2f}", f"{min(seconds):.2f}",
                     f"{max(seconds):.2f}",
                     f"{median([s.seconds + s.call_seconds for s in switches]):.2f}",
                     str(len(switches)),
                     f"{median([s.call_seconds for s in switches]):.3f}",
                     f"{sum(r.result.requests for r in mine):,}",
                     str(sum(r.result.bad_status for r in mine)),
                     str(sum(r.result.errors for r in mine))])
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return (f"### Alias cutover under load — {when}\n\n"
            f"const v1 ↔ v2, launcher fork, drain_timeout 5 s; wrk {options.threads} thread, "
            f"{options.connections} connections, {options.rounds} interleaved rounds of "
            f"{options.duration:.0f} s per mode, two moves per round (→ v2, → v1). Time from "
            "the registry call returning to the first answer with the new X-Model-Version "
            f"(probed every {PROBE_INTERVAL * 1000:.0f} ms); *from call start* adds the "
            "call itself (`mlflow server` may deliver the webhook before it answers). "
            "polling: poll_interval 1 s; "
            "webhook: poll_interval 10 m, alias moved through `mlflow server`. "
            f"{os.cpu_count()} CPUs, shared machine (noise possible).\n\n"
            + markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/cutover.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.set_defaults(rounds=2, duration=15.0)
    parser.add_argument("--log-level", default="INFO", help="the gateways' log level")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    report = run(options_from(args), log_level=args.log_level)
    print(report)
    print(f"saved to {save_result('cutover', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Progressive cutovers under load: a bad version rolled back, a good one promoted, a
gateway stopped mid-rollout.

    .venv/bin/python bench/rollout.py [--rounds 3]

A temporary sqlite registry holds ``canary`` (tests/models/canary.py, ``x + offset``): v1
good, v2 answers 500 for a fifth of inputs, v3 slow (unused), v4 good. Each scenario of
each round has its own gateway and alias (poll_interval 1 s), warm at v1:

    bad   rollout BAD; under load the alias moves 1 → 2, until rolled back
    good  rollout GOOD; under load the alias moves 1 → 4, until v4 serves alone
    term  state_dir, rollout 1 → 4 with a long step_time; SIGTERM at step 1, look for
          processes with the gateway's MODEL_GATEWAY_OWNER mark, restart on the same
          port: which version answers first, and at which step the rollout is

Load: wrk, 1 thread, 8 connections, one-row predictions with x = 1 … 10 in turn (a
fifth hit v2's failure), stopped (SIGINT) after the verdict. Status is polled every
50 ms from the admin API; times are from the registry call returning.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
    GatewayService,
    Options,
    add_options,
    ensure_tools,
    exit_on_sigterm,
    find_binary,
    markdown_table,
    median,
    options_from,
    save_result,
    stage,
    wait_for_quiet,
    wait_until,
)
from bench.probes import metric, predict, scrape, write_config
from bench.soak import owned_pids

MODEL = "canary"
CANARY = ROOT / "tests" / "models" / "canary.py"
VERSIONS = ({"offset": 1}, {"offset": 2, "fail_every": 5}, {"offset": 3, "sleep": 0.15},
            {"offset": 4})
STEPS = [10, 50, 100]
BAD = {"steps": STEPS, "step_time": "30s", "max_error_rate": "1%", "min_requests": 50}
GOOD_STEP = 5.0  # s
GOOD = {"steps": STEPS, "step_time": f"{GOOD_STEP:g}s", "min_requests": 50}
TERM = {**GOOD, "step_time": "10m"}
VERSION = {"bad": "2", "good": "4"}
ONE = b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}'
CONNECTIONS, POLL, LEAD, AFTER = 8, 0.05, 2.0, 2.0  # LEAD/AFTER: load before/after, s
VERDICT_TIMEOUT = 180.0
LUA = """
local n = 0
failed, versions = 0, {}
request = function()
  n = n + 1
  local x = (n - 1) % 10 + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
    '{"dataframe_split": {"columns": ["x"], "data": [[' .. x .. ']]}}')
end
response = function(status, headers, body)
  if status < 200 or status > 299 then failed = failed + 1 end
  local v = headers["x-model-version"] or headers["X-Model-Version"] or "none"
  versions[v] = (versions[v] or 0) + 1
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local f, parts, e = 0, {}, summary.errors
  for _, t in ipairs(threads) do
    f = f + t:get("failed")
    for k, c in pairs(t:get("versions")) do parts[#parts + 1] = '"' .. k .. '": ' .. c end
  end
  io.write(string.format('LOAD {"requests": %d, "failed": %d, "socket_errors": %d, '
    .. '"versions": {%s}}\\n', summary.requests, f,
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ", ")))
end
"""


def build_registry(root: Path) -> str:
    """``canary`` v1 … v4 (VERSIONS) in a sqlite registry under ``root``; its URI."""
    warnings.filterwarnings("ignore")
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).create_experiment(
        "bench-rollout", artifact_location=(root / "artifacts").as_uri()))
    for config in VERSIONS:
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=str(CANARY), model_config=config,
                                    input_example=pd.DataFrame({"x": [1.0]}),
                                    registered_model_name=MODEL)
    return uri


def move(uri: str, alias: str, version: str) -> float:
    """Point ``alias`` at ``version``; the monotonic time the call returned."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_registered_model_alias(MODEL, alias, version)
    return time.monotonic()


class Gateway(GatewayService):
    """GatewayService on a given port (a restart on the port of the one before)."""

    def __init__(self, config: Path, log_path: Path, port: int | None = None) -> None:
        super().__init__(config, log_path)
        if port is not None:
            self.port, self.url = port, f"http://127.0.0.1:{port}"
            self.argv[self.argv.index("--port") + 1] = str(port)
        self.owner = f"gateway@127.0.0.1:{self.port}"  # the mark its runners carry

    def invocations(self, alias: str) -> str:
        return f"{self.url}/models/{MODEL}/{alias}/invocations"


@contextlib.contextmanager
def serving(work: Path, uri: str, alias: str, rollout: dict[str, Any],
            **config: Any) -> Iterator[Gateway]:
    """A gateway whose endpoint ``canary/alias`` answers from v1."""
    move(uri, alias, "1")
    endpoint = {"name": MODEL, "alias": alias, "poll_interval": "1s", "drain_timeout": "3s",
                "rollout": rollout}
    path = write_config(work / f"{alias}.yaml", {"tracking_uri": uri, "access_log": False,
                                                  "endpoints": [endpoint], **config})
    with Gateway(path, work / f"{alias}.log") as gw:
        wait_until(lambda: predict(gw.invocations(alias), ONE, 120) == (200, "1"), 120,
                   f"{alias} answering from v1")
        yield gw


class Wrk:
    """wrk sending LUA's load to ``url`` until :meth:`stop` (SIGINT: it prints its done)."""

    def __init__(self, url: str, work: Path) -> None:
        (script := work / "rollout.lua").write_text(LUA)
        self.proc = subprocess.Popen([str(find_binary("wrk")), "-t1", f"-c{CONNECTIONS}",
                                      "-d600s", "--timeout", "30s", "-s", str(script), url],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        line = next((ln for ln in out.splitlines() if ln.startswith("LOAD ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {out[-500:]}{err[-500:]}")
        result: dict[str, Any] = json.loads(line.removeprefix("LOAD "))
        return result

    def __enter__(self) -> Wrk:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Trace:
    green: float | None  # s from the move to the first status with a rollout (green warm)
    end: float  # s from the move to the status that ``finished``
    shares: list[float]  # the shares seen, in order
    status: dict[str, Any]  # that last status
    failed: float  # the gateway's 5xx count for the endpoint then


def follow(gw: Gateway, alias: str, moved: float,
           finished: Callable[[dict[str, Any]], Any]) -> Trace:
    """Poll the endpoint's status until ``finished(status)``."""
    green, shares = None, []
    while True:
        status, now = gw.status(MODEL, alias), time.monotonic() - moved
        if (rollout := status["rollout"]) is not None:
            green = now if green is None else green
            if rollout["share"] not in shares:
                shares.append(rollout["share"])
        if finished(status):
            return Trace(green, now, shares, status, metric(
                scrape(gw.url), "model_gateway_requests_total", alias=alias, status_class="5xx"))
        if now > VERDICT_TIMEOUT:
            raise TimeoutError(f"{alias}: no verdict in {VERDICT_TIMEOUT:.0f}s:\n{gw.tail()}")
        gw.check_alive()
        time.sleep(POLL)


def load_round(work: Path, uri: str, n: int, *, kind: str) -> dict[str, Any]:
    """Move the alias 1 → 2 (``bad``) or 1 → 4 (``good``) under load until the verdict."""
    alias, rollout, to = f"{kind}-{n}", BAD if kind == "bad" else GOOD, VERSION[kind]
    with serving(work, uri, alias, rollout) as gw, Wrk(gw.invocations(alias), work) as load:
        time.sleep(LEAD)
        trace = follow(gw, alias, move(uri, alias, to),
                       lambda s: s["rolled_back"] or s["version"] == to)
        time.sleep(AFTER)
        figures = load.stop()
        after = metric(scrape(gw.url), "model_gateway_requests_total", alias=alias,
                       status_class="5xx") - trace.failed
    rolled = trace.status["rolled_back"]
    reason = "promoted" if rolled is None else f"rolled back: {rolled['reason']}"
    step = re.search(r"at step (\d+ \([\d.]+%\))", reason)
    return {"failed": figures["failed"] + figures["socket_errors"], "gw5xx": trace.failed,
            "after": after, "green": trace.green, "seconds": trace.end,
            "late": trace.end - (trace.green or 0.0) - GOOD_STEP * len(STEPS),
            "shares": trace.shares, "step": step.group(1) if step else "-", "reason": reason,
            "requests": figures["requests"], "versions": figures["versions"]}


def term_round(work: Path, uri: str, n: int) -> dict[str, Any]:
    alias, state = f"term-{n}", str(work / f"state-{n}")
    with serving(work, uri, alias, TERM, state_dir=state) as gw:
        follow(gw, alias, move(uri, alias, "4"), lambda s: (s["rollout"] or {}).get("share"))
        runners = len(owned_pids(gw.owner))
        proc, signalled = gw.proc, time.monotonic()
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        exited = time.monotonic() - signalled
        left = owned_pids(gw.owner)
        port, config = gw.port, gw.argv[gw.argv.index("--config") + 1]
    started = time.monotonic()
    with Gateway(Path(config), work / f"{alias}-again.log", port) as again:
        first = predict(again.invocations(alias), ONE, 120)
        answered = time.monotonic() - started
        trace = follow(again, alias, started, lambda s: s["rollout"])
    rollout = trace.status["rollout"]
    return {"runners": runners, "code": code, "exit": exited, "left": len(left),
            "first": f"{first[0]} v{first[1]}", "answered": answered,
            "again": f"v{rollout['version']} step {rollout['step']} ({rollout['share']:g}%)",
            "again_s": trace.end}


def run(options: Options) -> str:
    """Run the section; returns its markdown report."""
    ensure_tools({"wrk": "wrk"})
    rounds: dict[str, list[dict[str, Any]]] = {"bad": [], "good": [], "term": []}
    scenarios: dict[str, Callable[[Path, str, int], dict[str, Any]]] = {
        "bad": functools.partial(load_round, kind="bad"),
        "good": functools.partial(load_round, kind="good"), "term": term_round}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        work = Path(tmp)
        with stage("building the registry (canary v1 … v4)"):
            uri = build_registry(work)
        for n in range(1, options.rounds + 1):
            for name, scenario in scenarios.items():
                if options.quiet_wait:
                    wait_for_quiet(min(options.quiet_wait, 15), threshold=options.max_noise)
                with stage(f"round {n}/{options.rounds}: {name}"):
                    load = os.getloadavg()[0]
                    result = {"round": n, **scenario(work, uri, n), "load": load}
                    rounds[name].append(result)
                    print(f"    {result}", file=sys.stderr, flush=True)
    return render(rounds)


Column = tuple[str, Callable[[dict[str, Any]], str], str | None]  # header, cell, median of


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """One row per round, then a row of medians of the columns that name a key."""
    body = [[cell(r) for _, cell, _ in columns] for r in rows]
    body.append(["" if key is None else "**" + _s(median(
        [r[key] for r in rows if r[key] is not None])) + "**" for _, _, key in columns])
    return markdown_table([h for h, _, _ in columns], body)


def _served(r: dict[str, Any]) -> str:
    return f"{r['requests']:,} (" + ", ".join(
        f"v{v} {c:,}" for v, c in sorted(r["versions"].items())) + ")"


def render(rounds: dict[str, list[dict[str, Any]]]) -> str:
    step_s = GOOD_STEP * len(STEPS)
    first: Column = ("round", lambda r: str(r["round"]), None)
    last: Column = ("load 1m", lambda r: f"{r['load']:.1f}", None)
    bad = _table(rounds["bad"], [
        first, ("failed (wrk)", lambda r: str(r["failed"]), "failed"),
        ("5xx at verdict", lambda r: f"{r['gw5xx']:.0f}", None),
        ("5xx after", lambda r: f"{r['after']:.0f}", None),
        ("s to green", lambda r: _s(r["green"]), "green"),
        ("s to rollback", lambda r: _s(r["seconds"]), "seconds"),
        ("step", lambda r: r["step"], None), ("verdict", lambda r: r["reason"], None),
        ("requests", _served, None), last])
    good = _table(rounds["good"], [
        first, ("failed", lambda r: str(r["failed"]), "failed"),
        ("s to green", lambda r: _s(r["green"]), "green"),
        ("s to promotion", lambda r: _s(r["seconds"]), "seconds"),
        (f"promotion − green − {step_s:g} s", lambda r: _s(r["late"]), "late"),
        ("shares seen", lambda r: ", ".join(f"{s:g}" for s in r["shares"]), None),
        ("outcome", lambda r: r["reason"], None), ("requests", _served, None), last])
    term = _table(rounds["term"], [
        first, ("owned processes at SIGTERM", lambda r: str(r["runners"]), None),
        ("exit code", lambda r: str(r["code"]), None),
        ("s to exit", lambda r: _s(r["exit"]), "exit"),
        ("processes left", lambda r: str(r["left"]), None),
        ("first answer", lambda r: r["first"], None),
        ("s to first answer", lambda r: _s(r["answered"]), "answered"),
        ("rollout after restart", lambda r: r["again"], None),
        ("s to rollout", lambda r: _s(r["again_s"]), "again_s"), last])
    return "\n\n".join([
        f"## Progressive cutovers ({time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"{len(rounds['bad'])} rounds, medians in bold; {os.cpu_count()} CPUs, shared)",
        f"wrk 1 thread, {CONNECTIONS} connections, x = 1 … 10 in turn; poll_interval 1 s. "
        "Times from the alias move (registry call returned); *s to green*: first status "
        "with a rollout (green warm, at step 1).",
        f"**Bad version** (v2: 500 on a fifth of inputs), rollout {BAD}. Goal: rolled back "
        "at step 1 after at most 50 × 1/5 = 10 failed requests. *5xx*: the gateway's count "
        "when the rollback was seen, and after it.", bad,
        f"**Good version** (v4), rollout {GOOD}. Goal: 0 failed, promoted about "
        f"{step_s:g} s after green is warm.", good,
        f"**SIGTERM mid-rollout** (1 → 4 at step 1, rollout {TERM}, state_dir set). "
        "*processes left*: carrying the gateway's owner mark just after it exited; then a "
        "restart on the same port, times from its launch.", term])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/rollout.py", description=__doc__.split("\n")[0])
    add_options(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    report = run(options_from(args))
    print(report)
    print(f"saved to {save_result('rollout', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

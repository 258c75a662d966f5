"""Cold start, runner memory and the cost of many declared endpoints.

    .venv/bin/python bench/coldstart.py [--rounds 3] [--scale 10,1000]

Uses the demo registry (built with ``demo/build.py`` when missing). Three measurements:

1. Cold start to the first prediction, interleaved round after round: a request to a
   never-started gateway endpoint with launcher ``fork`` (the zygote is warmed first
   through a throwaway endpoint), the same with launchers ``direct`` and ``cli``, and a
   plain ``mlflow models serve -m models:/iris@champion --env-manager local`` timed from
   its process start to its first 200 (then its process group is killed).
2. PSS and RSS (``/proc/PID/smaps_rollup``) of three fork runners and three direct
   runners, of the gateway process itself and of its zygote.
3. Gateway startup (process start → ``/readyz`` 200) and idle memory with few and with
   many declared endpoints, none of them called.

Medians are printed as markdown tables (and saved under ``bench/results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    GatewayService,
    Options,
    Service,
    add_options,
    exit_on_sigterm,
    free_port,
    markdown_table,
    median,
    options_from,
    process_tree,
    save_result,
    stage,
    wait_for_quiet,
    wait_until,
)
from bench.probes import Memory, leftovers, memory, mib, predict, write_config
from bench.proxy import BODY, DEMO_DB, ensure_demo

MODEL_URI = "models:/iris@champion"
LAUNCHERS = ("fork", "direct", "cli", "serve")  # serve: a plain `mlflow models serve`
MEMORY_RUNNERS = 3  # runners of each launcher whose memory is reported
SCALE = (10, 1000)
START_TIMEOUT = 300.0


def _tracking_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{DEMO_DB}",
            "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}


def _config(work: Path, name: str, endpoints: list[dict[str, Any]], **pool: Any) -> Path:
    return write_config(work / f"{name}.yaml", {
        "tracking_uri": f"sqlite:///{DEMO_DB}",
        "access_log": False,
        "pool": {"idle_timeout": 0, **pool},
        "endpoints": endpoints,
    })


def _first_prediction(url: str, started: float, check: Any = None) -> float:
    """Seconds from ``started`` to the first 200 from ``url`` (polled every 20 ms)."""
    def answered() -> bool:
        if check is not None:
            check()
        status, _ = predict(url, BODY, timeout=START_TIMEOUT)
        if status not in (200, 502, 503):
            raise RuntimeError(f"{url} answered {status}")
        return status == 200

    wait_until(answered, START_TIMEOUT, f"a prediction from {url}", interval=0.02)
    return time.monotonic() - started


def time_gateway(gateway: GatewayService, alias: str) -> float:
    started = time.monotonic()
    status, _ = predict(f"{gateway.url}/models/iris/{alias}/invocations", BODY,
                        timeout=START_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"iris/{alias} answered {status} on its cold start:\n"
                           f"{gateway.tail()}")
    return time.monotonic() - started


def time_mlflow_serve(work: Path, round_no: int) -> float:
    port = free_port()
    serve = Service([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                     MODEL_URI, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                    work / f"mlflow-serve-{round_no}.log", env=_tracking_env())
    serve.name = "mlflow models serve"
    started = time.monotonic()
    with serve:
        return _first_prediction(f"http://127.0.0.1:{port}/invocations", started,
                                 serve.check_alive)


def _group_memory(pgid: int) -> Memory:
    """PSS and RSS of every process in a runner's process group."""
    members = [memory(pid) for pid in process_tree(pgid)]
    return Memory(pid=pgid, pss=sum(m.pss for m in members), rss=sum(m.rss for m in members))


def _ppid(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2:].split()[1])


def cold_starts(options: Options, work: Path, log_level: str
                ) -> tuple[dict[str, list[float]], dict[str, Memory | list[Memory]]]:
    count = max(options.rounds, MEMORY_RUNNERS)
    endpoints = [{"name": "iris", "alias": "warm", "model_uri": MODEL_URI, "launcher": "fork"}]
    for launcher in ("fork", "direct", "cli"):
        endpoints += [{"name": "iris", "alias": f"{launcher}-{i}", "model_uri": MODEL_URI,
                       "launcher": launcher} for i in range(1, count + 1)]
    config = _config(work, "coldstart", endpoints, max_runners=len(endpoints) + 1)
    times: dict[str, list[float]] = {launcher: [] for launcher in LAUNCHERS}
    mem: dict[str, Memory | list[Memory]] = {}
    with GatewayService(config, work / "gateway-coldstart.log", log_level=log_level) as gateway:
        with stage("warming the zygote through iris/warm"):
            time_gateway(gateway, "warm")
        for round_no in range(1, options.rounds + 1):
            with stage(f"cold-start round {round_no}/{options.rounds}"):
                for launcher in LAUNCHERS:
                    if options.quiet_wait:
                        wait_for_quiet(min(options.quiet_wait, 15), threshold=options.max_noise)
                    if launcher == "serve":
                        seconds = time_mlflow_serve(work, round_no)
                    else:
                        seconds = time_gateway(gateway, f"{launcher}-{round_no}")
                    times[launcher].append(seconds)
                    print(f"    {launcher:<7} {seconds:6.2f} s", file=sys.stderr, flush=True)
        with stage(f"memory of {MEMORY_RUNNERS} runners of each launcher"):
            for launcher in ("fork", "direct", "cli"):
                runners = []
                for i in range(1, MEMORY_RUNNERS + 1):
                    if i > options.rounds:
                        time_gateway(gateway, f"{launcher}-{i}")
                    runners.append(int(gateway.runner("iris", f"{launcher}-{i}")["pid"]))
                if len(set(runners)) != len(runners):
                    raise RuntimeError(f"{launcher} endpoints share runner pids: {runners}")
                time.sleep(1)  # let the last runner settle
                # A cli runner is two processes (the CLI and its uvicorn): count its group.
                mem[launcher] = [_group_memory(pid) for pid in runners]
                if launcher == "fork":
                    zygote = _ppid(runners[0])
                    if zygote != gateway.pid:
                        mem["zygote"] = memory(zygote)
            mem["gateway"] = memory(gateway.pid)
    return times, mem


def _start_timed(gateway: GatewayService) -> float:
    """Start the gateway; seconds from process start to /readyz 200 (20 ms polling)."""
    started = time.monotonic()
    Service.start(gateway)
    try:
        wait_until(gateway._ready, 300, "gateway /readyz", interval=0.02)
    except BaseException:
        gateway.stop()
        raise
    return time.monotonic() - started


def scale(options: Options, work: Path, counts: Sequence[int], log_level: str
          ) -> dict[int, list[tuple[float, Memory, int]]]:
    """Per count: (startup seconds, gateway memory, RSS of its whole process tree)."""
    results: dict[int, list[tuple[float, Memory, int]]] = {n: [] for n in counts}
    for round_no in range(1, options.rounds + 1):
        with stage(f"declared-endpoints round {round_no}/{options.rounds}"):
            for n in counts:
                endpoints = [{"name": "iris", "alias": f"e{i}", "model_uri": MODEL_URI}
                             for i in range(n)]
                config = _config(work, f"scale-{n}", endpoints)
                if options.quiet_wait:
                    wait_for_quiet(min(options.quiet_wait, 15), threshold=options.max_noise)
                gateway = GatewayService(config, work / f"gateway-scale-{n}.log",
                                         log_level=log_level)
                try:
                    seconds = _start_timed(gateway)
                    time.sleep(2)  # idle: let startup work finish
                    tree = [pid for pid in process_tree(gateway.pid) if pid != gateway.pid]
                    own = memory(gateway.pid)
                    tree_rss = own.rss + sum(memory(pid).rss for pid in tree)
                finally:
                    gateway.stop()
                left = leftovers(tree)
                if left:
                    raise RuntimeError(f"processes left after stopping the gateway: {left}")
                results[n].append((seconds, own, tree_rss))
                print(f"    {n:>5} endpoints: ready in {seconds:5.2f} s, RSS {mib(own.rss)} "
                      f"MiB", file=sys.stderr, flush=True)
    return results


def run(options: Options, *, counts: Sequence[int] = SCALE, log_level: str = "WARNING") -> str:
    """Run the section; returns its markdown report."""
    ensure_demo()
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        work = Path(tmp)
        times, mem = cold_starts(options, work, log_level)
        sized = scale(options, work, counts, log_level)
    return render(options, times, mem, sized)


def render(options: Options, times: dict[str, list[float]],
           mem: dict[str, Memory | list[Memory]],
           sized: dict[int, list[tuple[float, Memory, int]]]) -> str:
    serve = median(times["serve"])
    names = {"fork": "gateway, launcher fork", "direct": "gateway, launcher direct",
             "cli": "gateway, launcher cli", "serve": "`mlflow models serve`"}
    rows = [[names[k], f"{median(v):.2f}", f"{median(v) / serve:.2f}",
             ", ".join(f"{s:.2f}" for s in v)] for k, v in times.items()]
    cold = markdown_table(["launcher", "median s", "× mlflow models serve", "rounds (s)"], rows)

    mem_rows = []
    for key, label in (("fork", "fork runner (each)"), ("direct", "direct runner (each)"),
                       ("cli", "cli runner (each, both processes)"),
                       ("zygote", "zygote"), ("gateway", "gateway process")):
        value = mem.get(key)
        if value is None:
            continue
        many = value if isinstance(value, list) else [value]
        mem_rows.append([label, mib(median([m.pss for m in many])),
                         mib(median([m.rss for m in many])),
                         ", ".join(f"{mib(m.pss)} (pid {m.pid})" for m in many)])
    memory_table = markdown_table(["process", "PSS MiB (median)", "RSS MiB (median)",
                                   "PSS each MiB (pid)"], mem_rows)

    base = min(sized)
    base_start = median([s for s, _, _ in sized[base]])
    base_rss = median([m.rss for _, m, _ in sized[base]])
    scale_rows = []
    for n, runs in sized.items():
        start = median([s for s, _, _ in runs])
        rss = median([m.rss for _, m, _ in runs])
        scale_rows.append([str(n), f"{start:.2f}", f"{start / base_start:.2f}", mib(rss),
                           f"{rss / base_rss:.2f}", mib(median([m.pss for _, m, _ in runs])),
                           mib(median([t for _, _, t in runs]))])
    scale_table = markdown_table(["declared endpoints", "startup s", f"× {base}",
                                  "idle RSS MiB", f"RSS × {base}", "idle PSS MiB",
                                  "process tree RSS MiB"], scale_rows)
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return (f"### Cold start — {when}\n\n"
            f"Demo registry, `{MODEL_URI}`; {options.rounds} interleaved rounds "
            "(fork, direct, mlflow models serve), medians; each gateway round uses a "
            "never-started endpoint, the zygote warmed first. Gateway: request sent → 200; "
            "`mlflow models serve`: process start → first 200 (polled every 20 ms). "
            f"{os.cpu_count()} CPUs, shared machine (other jobs may add noise).\n\n"
            f"{cold}\n\n"
            f"Memory after {MEMORY_RUNNERS} runners of each launcher were started "
            "(`/proc/PID/smaps_rollup`; PSS splits shared pages among the processes "
            "sharing them):\n\n"
            f"{memory_table}\n\n"
            "Declared endpoints, none called: gateway process start → `/readyz` 200, then "
            "its memory 2 s later (process tree: the gateway and its children, e.g. the "
            "zygote):\n\n"
            f"{scale_table}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/coldstart.py",
                                     description=__doc__.split("\n")[0])
    add_options(parser)
    parser.add_argument("--scale", default=",".join(map(str, SCALE)),
                        help="comma-separated numbers of declared endpoints to compare")
    parser.add_argument("--log-level", default="WARNING", help="the gateway's log level")
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(n) for n in args.scale.split(",") if n})
    except ValueError:
        parser.error("--scale takes comma-separated integers")
    if not counts or min(counts) < 1:
        parser.error("--scale needs positive counts")
    exit_on_sigterm()
    report = run(options_from(args), counts=counts, log_level=args.log_level)
    print(report)
    print(f"saved to {save_result('coldstart', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


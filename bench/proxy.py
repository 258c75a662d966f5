"""Proxy overhead: the gateway against the runner itself and against nginx.

    .venv/bin/python bench/proxy.py [--rounds 3] [--duration 10] [--connections 16]

Builds the demo registry if it is missing, serves ``config/gateway.yaml`` on a free port
and warms ``iris@champion``; starts nginx (one worker, keep-alive upstream) in front of
the same runner process. wrk (1 thread) then loads ``/ping`` and ``/invocations`` (a 2-row
JSON body) through three targets, interleaved round after round:

    direct   the runner's own loopback port
    gateway  /models/iris/champion/<action> through the gateway
    nginx    nginx in front of that runner

and a markdown table of the medians is printed (and saved under ``bench/results/``):
req/s, p50 and p99 latency, the ratio to direct, and the CPU time the proxy and the runner
spend per request. wrk and nginx are installed with apt-get when missing. Everything the
benchmark starts is stopped when it ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
    GatewayService,
    Load,
    NginxService,
    Options,
    WrkResult,
    add_options,
    children_cpu_seconds,
    cpu_seconds,
    ensure_tools,
    exit_on_sigterm,
    http,
    machine_cpu_seconds,
    markdown_table,
    median,
    options_from,
    pin,
    process_tree,
    run_wrk,
    save_result,
    stage,
    wait_for_quiet,
    wait_until,
)
from bench.probes import write_config

CONFIG = ROOT / "config" / "gateway.yaml"
DEMO_DB = ROOT / "demo" / "mlflow.db"
MODEL = ("iris", "champion")
BODY = b'{"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}'
PATHS: dict[str, Load] = {"ping": Load("GET"), "invocations": Load("POST", BODY)}
TARGETS = ("direct", "gateway", "nginx")


@dataclass
class Target:
    name: str
    base_url: str  # the action is appended: f"{base_url}/{path}"
    proxy_pids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    result: WrkResult
    proxy_cpu_us: float | None  # per request, None for the direct target
    runner_cpu_us: float
    other_load: float  # CPUs' worth used by processes outside the benchmark: noise


def ensure_demo() -> None:
    if DEMO_DB.exists():
        return
    with stage("building the demo registry (demo/build.py)"):
        subprocess.run([sys.executable, str(ROOT / "demo" / "build.py")], cwd=ROOT,
                       check=True, timeout=600)


def warm(url: str) -> None:
    """POST the body until a 200 (the first request starts the runner)."""
    def answered() -> bool:
        status, body = http(url, method="POST", body=BODY, timeout=300)
        if status != 200:
            raise RuntimeError(f"warm-up answered {status}: {body[:300]!r}")
        return True

    wait_until(answered, 300, f"a prediction from {url}")


def _cpu_counters(runner: list[int], proxy: list[int]) -> tuple[float, ...]:
    """CPU seconds so far: runner, proxy, finished children (wrk), whole machine."""
    return (cpu_seconds(runner), cpu_seconds(proxy), children_cpu_seconds(),
            machine_cpu_seconds())


def measure(target: Target, path: str, runner_pid: int, options: Options, work: Path,
            duration: float) -> Sample:
    runner, proxy = [runner_pid], target.proxy_pids
    before = _cpu_counters(runner, proxy)
    result = run_wrk(f"{target.base_url}/{path}", PATHS[path], duration=duration,
                     connections=options.connections, threads=options.threads,
                     script_dir=work)
    runner_cpu, proxy_cpu, wrk_cpu, machine_cpu = (
        after - then for after, then in zip(_cpu_counters(runner, proxy), before, strict=True))
    per = 1e6 / max(result.requests, 1)
    other = max(machine_cpu - runner_cpu - proxy_cpu - wrk_cpu, 0.0) / max(result.seconds, 1e-3)
    return Sample(result, proxy_cpu * per if proxy else None, runner_cpu * per, other)


def measure_quietly(target: Target, path: str, runner_pid: int, options: Options,
                    work: Path) -> Sample:
    """One measured run, redone (``options.retries`` times at most) while other processes
    used more than ``options.max_noise`` CPUs during it."""
    for attempt in range(options.retries + 1):
        if options.quiet_wait:
            wait_for_quiet(options.quiet_wait, threshold=options.max_noise)
        sample = measure(target, path, runner_pid, options, work, options.duration)
        r = sample.result
        noisy = sample.other_load > options.max_noise
        print(f"    {path:<12} {target.name:<8} {r.rps:8.1f} req/s  p50 {r.p50_ms:6.2f} ms  "
              f"p99 {r.p99_ms:7.2f} ms  other load {sample.other_load:4.2f} CPU"
              + (f"  ERRORS {r.errors + r.bad_status}" if r.errors or r.bad_status else "")
              + ("  (noisy, redone)" if noisy and attempt < options.retries else ""),
              file=sys.stderr, flush=True)
        if not noisy:
            break
    return sample


def run(options: Options, *, targets: Sequence[str] = TARGETS,
        paths: Sequence[str] = tuple(PATHS), log_level: str = "INFO",
        pinned: bool = False) -> str:
    """Run the section; returns its markdown report."""
    ensure_tools({"wrk": "wrk", "nginx": "nginx"})
    ensure_demo()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{DEMO_DB}"}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-proxy-")))
        # The demo's config, with runners on TCP too: the direct target calls the runner.
        config = yaml.safe_load(CONFIG.read_text())
        config.setdefault("pool", {})["runner_tcp"] = True
        config_path = write_config(work / "gateway.yaml", config)
        with stage("starting the gateway"):
            gateway = stack.enter_context(GatewayService(config_path, work / "gateway.log",
                                                         log_level=log_level, env=env))
        model_url = f"{gateway.url}/models/{MODEL[0]}/{MODEL[1]}"
        with stage(f"warming {MODEL[0]}@{MODEL[1]} (cold start of its runner)"):
            warm(f"{model_url}/invocations")
        runner = gateway.runner(*MODEL)  # on TCP too: pool.runner_tcp above
        runner_port, runner_pid = int(runner["port"]), int(runner["pid"])
        direct = f"http://127.0.0.1:{runner_port}"
        all_targets = {"direct": Target("direct", direct),
                       "gateway": Target("gateway", model_url, [gateway.pid])}
        if "nginx" in targets:
            nginx = stack.enter_context(NginxService(runner_port, work / "nginx"))
            all_targets["nginx"] = Target("nginx", nginx.url, process_tree(nginx.pid))
        chosen = [all_targets[name] for name in targets]
        if pinned:  # the runner alone on CPU 0; wrk (our child) and the proxies on CPU 1
            pin(process_tree(runner_pid), {0})
            pin([os.getpid(), *(pid for t in chosen for pid in t.proxy_pids)], {1})
        for target in chosen:
            warm(f"{target.base_url}/invocations")
        if options.warmup > 0:
            with stage(f"warm-up load, {options.warmup:.0f}s per target and path"):
                for path in paths:
                    for target in chosen:
                        measure(target, path, runner_pid, options, work, options.warmup)
        samples: dict[tuple[str, str], list[Sample]] = {}
        for round_no in range(1, options.rounds + 1):
            with stage(f"round {round_no}/{options.rounds}"):
                for path in paths:
                    for target in chosen:
                        sample = measure_quietly(target, path, runner_pid, options, work)
                        samples.setdefault((path, target.name), []).append(sample)
                gateway.check_alive()
        report = render(samples, options, paths, [t.name for t in chosen], log_level, pinned)
        with stage("stopping the gateway, its runner and nginx"):
            stack.close()
    return report


def render(samples: dict[tuple[str, str], list[Sample]], options: Options,
           paths: Sequence[str], targets: Sequence[str], log_level: str,
           pinned: bool = False) -> str:
    header = ["path", "target", "req/s", "p50 ms", "p99 ms", "× direct req/s",
              "Δ p50 ms", "proxy CPU µs/req", "runner CPU µs/req", "other load", "errors"]
    rows = []
    for path in paths:
        base = samples.get((path, "direct"))
        for target in targets:
            runs = samples[(path, target)]
            results = [s.result for s in runs]
            proxy = [s.proxy_cpu_us for s in runs if s.proxy_cpu_us is not None]
            ratio = delta = "—"
            if base is not None and target != "direct":
                # Per round: each run is compared with the direct run next to it.
                pairs = [(s.result, b.result) for s, b in zip(runs, base, strict=True)]
                ratio = f"{median([r.rps / d.rps for r, d in pairs]):.3f}"
                delta = f"{median([r.p50_ms - d.p50_ms for r, d in pairs]):+.2f}"
            errors = sum(r.errors + r.bad_status for r in results)
            rows.append([f"`/{path}`", target, f"{median([r.rps for r in results]):,.0f}",
                         f"{median([r.p50_ms for r in results]):.2f}",
                         f"{median([r.p99_ms for r in results]):.2f}", ratio, delta,
                         f"{median(proxy):.0f}" if proxy else "—",
                         f"{median([s.runner_cpu_us for s in runs]):.0f}",
                         f"{median([s.other_load for s in runs]):.2f}", str(errors)])
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    title = (f"### Proxy overhead — {when}\n\n"
             f"wrk {options.threads} thread, {options.connections} connections, "
             f"{options.rounds} interleaved rounds of {options.duration:.0f} s, medians; "
             f"gateway log level {log_level}; {os.cpu_count()} CPUs"
             f"{' (runner pinned to CPU 0; wrk, gateway and nginx to CPU 1)' if pinned else ''}, "
             f"Python {platform.python_version()}, commit {_commit()}. "
             "CPU columns are per request, from /proc; *other load* is the CPUs' worth "
             "used meanwhile by processes outside the benchmark (noise); a run with more "
             f"than {options.max_noise:.2f} was redone (up to {options.retries} times).\n")
    return title + "\n" + markdown_table(header, rows)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "runners"],
                               cwd=ROOT, text=True, capture_output=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' + local changes' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/proxy.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--log-level", default="INFO", help="the gateway's log level")
    parser.add_argument("--pin", action="store_true",
                        help="pin the runner to CPU 0 and wrk, the gateway and nginx to CPU 1 "
                             "(the runner keeps a core to itself, as with a load generator on "
                             "another machine)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    if not set(targets) <= set(TARGETS) or not set(paths) <= set(PATHS) or not targets:
        parser.error("unknown target or path")
    if "direct" not in targets:
        targets.insert(0, "direct")  # every ratio is taken against it
    exit_on_sigterm()
    report = run(options_from(args), targets=targets, paths=paths, log_level=args.log_level,
                 pinned=args.pin)
    print(report)
    print(f"saved to {save_result('proxy', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What shadow traffic and the inference log cost the primary's callers.

    .venv/bin/python bench/traffic.py [--rounds 5] [--duration 5]

One gateway over the demo registry with endpoints of the same model (``iris@champion``):
``plain``, ``shadowed`` (``shadow: {to: target, percent: 25}``, ``target`` being another
endpoint of the same model), ``yielding`` (the same, to ``idle``: a shadow endpoint with
``nice: 19``, whose runner yields the CPU to the primary's) and ``logged``
(``inference_log`` at ``sample: 100%``). wrk
(1 thread, 16 connections) sends 2-row predictions to each in turn, round after round;
medians of req/s and latency are reported against ``plain``, with the shadow's outcomes
and the log's lines written and dropped, from the gateway's metrics.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    GatewayService,
    Load,
    Options,
    add_options,
    exit_on_sigterm,
    markdown_table,
    median,
    options_from,
    run_wrk,
    save_result,
    stage,
    wait_for_quiet,
)
from bench.probes import by_label, metric, predict, scrape, write_config
from bench.proxy import BODY, DEMO_DB, ensure_demo

TARGETS = ("plain", "shadowed", "yielding", "logged")
URI = "models:/iris@champion"


def run(options: Options) -> str:
    ensure_demo()
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as tmp:
        work = Path(tmp)
        log = work / "inference.jsonl"
        config = write_config(work / "traffic.yaml", {
            "tracking_uri": f"sqlite:///{DEMO_DB}", "access_log": False,
            "pool": {"idle_timeout": 0},
            "endpoints": [
                {"name": "iris", "alias": "plain", "model_uri": URI, "preload": True},
                {"name": "iris", "alias": "target", "model_uri": URI, "preload": True},
                {"name": "iris", "alias": "shadowed", "model_uri": URI, "preload": True,
                 "shadow": {"to": "target", "percent": 25}},
                {"name": "iris", "alias": "idle", "model_uri": URI, "preload": True,
                 "nice": 19},
                {"name": "iris", "alias": "yielding", "model_uri": URI, "preload": True,
                 "shadow": {"to": "idle", "percent": 25}},
                {"name": "iris", "alias": "logged", "model_uri": URI, "preload": True,
                 "inference_log": {"path": str(log), "sample": "100%"}}]})
        results: dict[str, list[Any]] = {t: [] for t in TARGETS}
        with GatewayService(config, work / "gateway.log", log_level="WARNING") as gateway:
            urls = {t: f"{gateway.url}/models/iris/{t}/invocations" for t in TARGETS}
            load = Load("POST", BODY)
            for url in urls.values():
                if predict(url, BODY, timeout=120)[0] != 200:
                    raise RuntimeError(f"{url} does not answer 200")
            with stage("warming up"):
                for url in urls.values():
                    run_wrk(url, load, duration=options.warmup, connections=16, threads=1,
                            script_dir=work)
            for round_no in range(1, options.rounds + 1):
                with stage(f"round {round_no}/{options.rounds}"):
                    for target in TARGETS:
                        if options.quiet_wait:
                            wait_for_quiet(min(options.quiet_wait, 15),
                                           threshold=options.max_noise)
                        result = run_wrk(urls[target], load, duration=options.duration,
                                         connections=16, threads=1, script_dir=work)
                        results[target].append(result)
                        print(f"    {target:<9} {result.rps:8.1f} req/s  p50 "
                              f"{result.p50_ms:6.2f} ms", file=sys.stderr, flush=True)
            time.sleep(2)  # the last shadow copies and log lines
            samples = scrape(gateway.url)
        outcomes = {alias: by_label([s for s in samples if s[1].get("alias") == alias],
                                    "model_gateway_shadow_requests_total", "outcome")
                    for alias in ("shadowed", "yielding")}
        lines = {r: metric(samples, "model_gateway_inference_log_lines_total", result=r)
                 for r in ("written", "dropped")}
    return render(results, outcomes, lines, options)


def render(results: dict[str, list[Any]], outcomes: dict[str, dict[str, float]],
           lines: dict[str, float], options: Options) -> str:
    base_rps = median([r.rps for r in results["plain"]])
    base_p50 = median([r.p50_ms for r in results["plain"]])
    rows = []
    for target in TARGETS:
        rps = median([r.rps for r in results[target]])
        p50 = median([r.p50_ms for r in results[target]])
        rows.append([target, f"{rps:,.0f}", f"{rps / base_rps:.3f}", f"{p50:.2f}",
                     f"{p50 - base_p50:+.2f}",
                     f"{median([r.p99_ms for r in results[target]]):.2f}",
                     str(sum(r.errors + r.bad_status for r in results[target]))])
    return "\n\n".join([
        f"## Shadow traffic and the inference log ({time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"{options.rounds} interleaved rounds × {options.duration:.0f} s, medians)",
        "wrk 1 thread, 16 connections, 2-row predictions to `iris@champion` endpoints:",
        markdown_table(["endpoint", "req/s", "× plain", "p50 ms", "Δ p50 ms", "p99 ms",
                        "errors"], rows),
        "Shadow outcomes: " + "; ".join(
            f"{alias}: " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(seen.items()))
                            or "none") for alias, seen in outcomes.items())
        + ". Inference log lines: "
        f"{lines['written']:,.0f} written, {lines['dropped']:,.0f} dropped.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/traffic.py",
                                     description=__doc__.split("\n")[0])
    add_options(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    report = run(options_from(args))
    print(report)
    print(f"saved to {save_result('traffic', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

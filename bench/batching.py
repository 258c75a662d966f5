"""Adaptive batching: throughput under many small requests, a lone client's latency, and
cold starts measured from readiness.

    .venv/bin/python bench/batching.py [--rounds 3] [--duration 10]

Builds its own registry (the test suite's models: the iris LogisticRegression, a LightGBM
classifier on iris) in a temporary directory. Three measurements, interleaved round
after round, medians reported:

1. 64 connections sending one-row ``dataframe_split`` requests (wrk) to a plain
   ``mlflow models serve``, to the gateway without batching and to the gateway with
   ``batching: {max_batch_size: 64}`` (one gateway, two endpoints of the same model):
   throughput, p50 and p99, and the mean batch size from the gateway's metrics.
2. One connection, the same request, to the gateway without and with batching
   (``max_wait: 0``): latency.
3. Cold start to the first prediction: a fresh gateway per round, timed from the moment
   its ``/readyz`` first answers 200 (the endpoint is not preloaded), against
   ``mlflow models serve`` timed from its process start; for scikit-learn and LightGBM.
4. In process: what MLflow's scoring function costs for 1 and 64 rows, what its parse of
   one request costs, and what the gateway's merging costs per request.
"""

from __future__ import annotations

import argparse
import json
import os
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
    Service,
    add_options,
    exit_on_sigterm,
    free_port,
    markdown_table,
    median,
    options_from,
    run_wrk,
    save_result,
    stage,
    wait_for_quiet,
    wait_until,
)
from bench.probes import metric, predict, scrape, write_config

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
BODY = json.dumps({"dataframe_split": {"columns": COLUMNS,
                                        "data": [[5.1, 3.5, 1.4, 0.2]]}}).encode()
CONNECTIONS = 64
FLAVOURS = {"scikit-learn": "models:/iris@champion", "LightGBM": "models:/lgbm@champion"}
START_TIMEOUT = 300.0


def _env(tracking_uri: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # `mlflow models serve` execs uvicorn
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}


def _serve(model_uri: str, tracking_uri: str, log: Path) -> tuple[Service, str]:
    port = free_port()
    service = Service([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                       model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                      log, env=_env(tracking_uri))
    service.name = "mlflow models serve"
    return service, f"http://127.0.0.1:{port}"


def _first_prediction(url: str, started: float, check: Any) -> float:
    def answered() -> bool:
        check()
        status, _ = predict(url, BODY, timeout=START_TIMEOUT)
        if status not in (200, 502, 503):
            raise RuntimeError(f"{url} answered {status}")
        return status == 200

    wait_until(answered, START_TIMEOUT, f"a prediction from {url}", interval=0.02)
    return time.monotonic() - started


def _quiet(options: Options) -> None:
    if options.quiet_wait:
        wait_for_quiet(min(options.quiet_wait, 15), threshold=options.max_noise)


def throughput(options: Options, work: Path, tracking_uri: str
               ) -> tuple[dict[str, list[Any]], list[float]]:
    """wrk results per target (64 and 1 connections) and the mean batch size per run."""
    config = write_config(work / "batching.yaml", {
        "tracking_uri": tracking_uri, "access_log": False, "pool": {"idle_timeout": 0},
        "endpoints": [
            {"name": "iris", "alias": "plain", "model_uri": FLAVOURS["scikit-learn"],
             "preload": True},
            {"name": "iris", "alias": "batched", "model_uri": FLAVOURS["scikit-learn"],
             "preload": True, "batching": {"max_batch_size": 64}}]})
    serve, serve_url = _serve(FLAVOURS["scikit-learn"], tracking_uri, work / "serve.log")
    results: dict[str, list[Any]] = {k: [] for k in ("serve", "plain", "batched",
                                                     "plain-1", "batched-1")}
    sizes: list[float] = []
    with GatewayService(config, work / "gateway.log", log_level="WARNING",
                        env=_env(tracking_uri)) as gateway, serve:
        _first_prediction(f"{serve_url}/invocations", time.monotonic(), serve.check_alive)
        urls = {"serve": f"{serve_url}/invocations",
                "plain": f"{gateway.url}/models/iris/plain/invocations",
                "batched": f"{gateway.url}/models/iris/batched/invocations"}
        load = Load("POST", BODY)
        with stage("warming up"):
            for url in urls.values():
                run_wrk(url, load, duration=options.warmup, connections=CONNECTIONS,
                        threads=1, script_dir=work)
        for round_no in range(1, options.rounds + 1):
            with stage(f"round {round_no}/{options.rounds}"):
                for name, url in urls.items():
                    _quiet(options)
                    before = scrape(gateway.url)
                    result = run_wrk(url, load, duration=options.duration,
                                     connections=CONNECTIONS, threads=1, script_dir=work)
                    results[name].append(result)
                    if name == "batched":
                        after = scrape(gateway.url)
                        calls = metric(after, "model_gateway_batch_size_count") - \
                            metric(before, "model_gateway_batch_size_count")
                        reqs = metric(after, "model_gateway_batch_size_sum") - \
                            metric(before, "model_gateway_batch_size_sum")
                        sizes.append(reqs / calls if calls else 0.0)
                    failed = result.errors + result.bad_status
                    print(f"    {name:<8} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} "
                          f"p99 {result.p99_ms:6.2f} ms  errors {failed}",
                          file=sys.stderr, flush=True)
                for name in ("plain", "batched"):
                    _quiet(options)
                    result = run_wrk(urls[name], load, duration=options.duration,
                                     connections=1, threads=1, script_dir=work)
                    results[f"{name}-1"].append(result)
                    print(f"    {name}-1  p50 {result.p50_ms:6.3f} p99 {result.p99_ms:6.3f} ms",
                          file=sys.stderr, flush=True)
    return results, sizes


def cold_starts(options: Options, work: Path, tracking_uri: str
                ) -> dict[str, dict[str, list[float]]]:
    """Per flavour: gateway seconds from /readyz 200 to the first prediction, and
    ``mlflow models serve`` seconds from its start to its first prediction."""
    times: dict[str, dict[str, list[float]]] = {f: {"gateway": [], "serve": [], "ready": []}
                                                for f in FLAVOURS}
    for round_no in range(1, options.rounds + 1):
        with stage(f"cold-start round {round_no}/{options.rounds}"):
            for flavour, uri in FLAVOURS.items():
                config = write_config(work / f"cold-{round_no}.yaml", {
                    "tracking_uri": tracking_uri, "access_log": False,
                    "endpoints": [{"name": "m", "alias": "cold", "model_uri": uri}]})
                _quiet(options)
                gateway = GatewayService(config, work / f"gateway-cold-{round_no}.log",
                                         log_level="WARNING", env=_env(tracking_uri))
                started = time.monotonic()
                Service.start(gateway)
                try:
                    wait_until(gateway._ready, START_TIMEOUT, "gateway /readyz", interval=0.02)
                    ready = time.monotonic()
                    times[flavour]["ready"].append(ready - started)
                    status, _ = predict(f"{gateway.url}/models/m/cold/invocations", BODY,
                                        timeout=START_TIMEOUT)
                    if status != 200:
                        raise RuntimeError(f"{flavour}: {status}\n{gateway.tail()}")
                    times[flavour]["gateway"].append(time.monotonic() - ready)
                finally:
                    gateway.stop()
                _quiet(options)
                serve, url = _serve(uri, tracking_uri, work / f"serve-{round_no}.log")
                started = time.monotonic()
                with serve:
                    times[flavour]["serve"].append(
                        _first_prediction(f"{url}/invocations", started, serve.check_alive))
                print(f"    {flavour:<12} gateway {times[flavour]['gateway'][-1]:.3f} s after "
                      f"ready ({times[flavour]['ready'][-1]:.2f} s to ready); mlflow models "
                      f"serve {times[flavour]['serve'][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def merge_costs(tracking_uri: str) -> dict[str, float]:
    """Microseconds, in process: MLflow's ``invocations()`` for 1 and 64 rows, its JSON
    parse of a one-row body, and the gateway's merging per request (read, its share of
    the merge and of the split). Where merging belongs follows from these: merged in the
    runner, each request would still pay MLflow's parse (and uvicorn's and FastAPI's)."""
    import timeit
    import warnings

    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    from gateway import merging

    warnings.filterwarnings("ignore")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    model = mlflow.pyfunc.load_model(FLAVOURS["scikit-learn"])
    schema = model.metadata.get_input_schema()
    rows64 = json.dumps({"dataframe_split": {"columns": COLUMNS,
                                             "data": [[5.1, 3.5, 1.4, 0.2]] * 64}})
    answer64 = json.dumps({"predictions": [0] * 64}).encode()

    def per_call(fn: Any, number: int = 200) -> float:
        fn()
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    def gateway_side() -> None:
        parts = [merging.read(b"application/json", BODY) for _ in range(64)]
        merging.split(answer64, parts)  # type: ignore[arg-type]
        merging.merge(b"application/json", parts)  # type: ignore[arg-type]

    return {
        "invocations_1": per_call(lambda: scoring_server.invocations(
            BODY, "application/json", model, schema)),
        "invocations_64": per_call(lambda: scoring_server.invocations(
            rows64, "application/json", model, schema)),
        "mlflow_parse_1": per_call(lambda: scoring_server._parse_json_data(
            BODY, model.metadata, schema)),
        "gateway_per_request": per_call(gateway_side, 50) / 64,
    }


def render(results: dict[str, list[Any]], sizes: list[float],
           cold: dict[str, dict[str, list[float]]], costs: dict[str, float],
           options: Options) -> str:
    def med(name: str, field: str) -> float:
        return median([getattr(r, field) for r in results[name]])

    serve_rps, plain_rps = med("serve", "rps"), med("plain", "rps")
    rows = []
    for name, label in (("serve", "`mlflow models serve`"), ("plain", "gateway, no batching"),
                        ("batched", "gateway, `batching: {max_batch_size: 64}`")):
        errors = sum(r.errors + r.bad_status for r in results[name])
        rows.append([label, f"{med(name, 'rps'):,.0f}", f"{med(name, 'rps') / serve_rps:.2f}×",
                     f"{med(name, 'rps') / plain_rps:.2f}×", f"{med(name, 'p50_ms'):.2f}",
                     f"{med(name, 'p99_ms'):.2f}", str(errors)])
    lone = [[label, f"{med(name, 'p50_ms'):.3f}", f"{med(name, 'p99_ms'):.3f}",
             f"{med(name, 'rps'):,.0f}"]
            for name, label in (("plain-1", "no batching"), ("batched-1", "batching, max_wait 0"))]
    ratio = med("batched-1", "p50_ms") / med("plain-1", "p50_ms")
    cold_rows = []
    for flavour, t in cold.items():
        g, s = median(t["gateway"]), median(t["serve"])
        cold_rows.append([flavour, f"{median(t['ready']):.2f}", f"{g:.3f}", f"{s:.2f}",
                          f"{g / s:.3f}×"])
    return "\n\n".join([
        f"## Batching ({time.strftime('%Y-%m-%d %H:%M')} UTC, {options.rounds} interleaved "
        f"rounds × {options.duration:.0f} s, medians)",
        f"{CONNECTIONS} connections, one-row `dataframe_split` requests to the iris model:",
        markdown_table(["target", "req/s", "vs serve", "vs gateway", "p50 ms", "p99 ms",
                        "errors"], rows),
        f"Mean batch size under this load: {median(sizes):.1f} requests per predict call.",
        "One connection (a lone client):",
        markdown_table(["gateway", "p50 ms", "p99 ms", "req/s"], lone),
        f"Lone client p50 with batching / without: {ratio:.3f}.",
        "Cold start to the first prediction (gateway: from `/readyz` 200, endpoint not "
        "preloaded; `mlflow models serve`: from its process start):",
        markdown_table(["flavour", "gateway start → ready s", "gateway ready → prediction s",
                        "mlflow models serve s", "ratio"], cold_rows),
        "Where merging belongs (in process, µs per call, best of 5):",
        markdown_table(["what", "µs"], [
            ["MLflow `invocations()`, 1 row", f"{costs['invocations_1']:,.0f}"],
            ["MLflow `invocations()`, 64 rows", f"{costs['invocations_64']:,.0f}"],
            ["MLflow's JSON parse of a 1-row body (paid per request if merged in the "
             "runner)", f"{costs['mlflow_parse_1']:,.0f}"],
            ["gateway merging per request (read, merge and split shares)",
             f"{costs['gateway_per_request']:,.1f}"]]),
    ])


def run(options: Options) -> str:
    from tests.registry import build_registry

    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        work = Path(tmp)
        with stage("building the registry"):
            registry = build_registry(work / "registry")
        results, sizes = throughput(options, work, registry.tracking_uri)
        cold = cold_starts(options, work, registry.tracking_uri)
        with stage("merging costs, in process"):
            costs = merge_costs(registry.tracking_uri)
    return render(results, sizes, cold, costs, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/batching.py",
                                     description=__doc__.split("\n")[0])
    add_options(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    report = run(options_from(args))
    print(report)
    print(f"saved to {save_result('batching', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark section and print their markdown reports.

    .venv/bin/python bench/run.py [--only proxy] [--rounds 3] [--duration 10]

A section is a module in ``bench/`` with ``run(options: Options) -> str`` (its markdown
report); add it to ``SECTIONS`` to have it run here. Each section also runs on its own
(``.venv/bin/python bench/<section>.py``) with its own extra options.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    batching,
    coldstart,
    cutover,
    hostile,
    many_models,
    peers,
    proxy,
    rollout,
    soak,
    traffic,
    v2,
)
from bench.harness import Options, add_options, exit_on_sigterm, options_from, save_result

SECTIONS: dict[str, Callable[[Options], str]] = {
    "proxy": proxy.run,
    # The same runs with the runner alone on one CPU: what the proxy costs when it does not
    # also compete with the runner and the load generator for two cores.
    "proxy_pinned": functools.partial(proxy.run, pinned=True),
    "coldstart": coldstart.run,
    "batching": batching.run,
    "traffic": traffic.run,  # what shadow traffic and the inference log cost callers
    "v2": lambda options: v2.run(options, 2),  # V2 inference against /invocations
    "cutover": cutover.run,
    "rollout": rollout.run,  # progressive cutovers: rolled back, promoted, SIGTERM mid-way
    "many_models": many_models.run,
    "peers": lambda options: peers.run(dataclasses.replace(options, rounds=10)),
    # Sections whose duration means something else keep their own.
    "soak": lambda options: soak.run(dataclasses.replace(options, duration=300.0)),
    "hostile": lambda options: hostile.run(dataclasses.replace(options, duration=30.0)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (of {','.join(SECTIONS)})")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SECTIONS)
    if unknown or not names:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown)) or '(none)'}")
    options = options_from(args)
    exit_on_sigterm()
    reports = [SECTIONS[name](options) for name in names]
    text = "\n\n".join(reports)
    print(text)
    print(f"saved to {save_result('all', text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

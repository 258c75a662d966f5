"""Soak: six registry-following endpoints on three runner slots, under faults, for minutes.

    .venv/bin/python bench/soak.py [--duration 300] [--tree PATH] [--extra-pool KEY=VALUE]

Builds a temporary MLflow registry (sqlite) with models ``alpha``, ``beta`` and
``gamma``: v1 predicts 1.0, v2 predicts 2.0, v3 has broken artifacts (its runner cannot
start). Six endpoints follow the aliases ``live`` (→ v1) and ``canary`` (→ v2) of each
model, launcher fork, ``poll_interval: 2s``, in a gateway with ``pool: {max_runners: 3}``
(plus any ``--extra-pool`` keys) and an admin token. The gateway is the code of
``--tree`` (default: this checkout): started with that cwd and that tree first on
PYTHONPATH, so one script measures a baseline worktree and the tree being changed.

Eight client threads POST a small prediction to a random endpoint, one after another,
each with a ~30 s timeout, recording status, error code, latency and ``X-Model-Version``.
Meanwhile, on a fixed schedule:

- every 30 s an alias moves: to the other good version, or (every third move) to the
  broken v3, and at the next move back to a good version; an endpoint that is cold while
  its alias names v3 fails its starts and backs off;
- every 60 s a live runner (a pid from ``/admin/endpoints``) is SIGKILLed;
- every 90 s the gateway gets SIGHUP (a reload of the unchanged config file).

A ``503 runner_unavailable`` sent after the alias had been moved back to a good version
is counted as a *stale backoff*. Cold starts, evictions, cutovers and restarts come from
``/metrics`` (before → after); the time from a runner's ready line to its eviction line
from the gateway's log. After the gateway stops, no process carrying its owner mark
(``MODEL_GATEWAY_OWNER``) may be left.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import yaml

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    RESULTS,
    ROOT,
    GatewayService,
    Options,
    add_options,
    exit_on_sigterm,
    http,
    markdown_table,
    median,
    options_from,
    save_result,
    stage,
    wait_until,
)
from bench.probes import Sample, alive, by_label, metric, predict, scrape, write_config
from bench.registry import break_version, constant_registry

MODELS = ("alpha", "beta", "gamma")
ALIASES = {"live": "1", "canary": "2"}  # alias → the version it names at the start
GOOD = ("1", "2")
BROKEN = "3"
ENDPOINTS = [f"{m}/{a}" for m in MODELS for a in ALIASES]
BODY = b'{"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}'
ADMIN_TOKEN = "bench-soak-admin-token"
CLIENTS = 8
REQUEST_TIMEOUT = 30.0
MOVE_EVERY, KILL_EVERY, HUP_EVERY = 30.0, 60.0, 90.0
KILL_SEARCH = 10.0  # how long to look for a live runner to SIGKILL
KILL_BLAME = 2.0  # a 502 answered this long after a SIGKILL of its endpoint's runner is its
STALE_AFTER = 10.0  # a 200 from an old version this long after the alias moved is stale
OWNER_ENV = "MODEL_GATEWAY_OWNER"  # the mark runners/launch.py puts in every child


# -- registry -----------------------------------------------------------------------------
def build_registry(root: Path) -> str:
    """alpha, beta, gamma: v1 → 1.0, v2 → 2.0, v3 broken; live → 1, canary → 2."""
    uri, client = constant_registry(root, "bench-soak", MODELS, (1.0, 2.0, 3.0))
    for model in MODELS:
        break_version(client, model, BROKEN)
        for alias, version in ALIASES.items():
            client.set_registered_model_alias(model, alias, version)
    return uri


# -- the gateway of a given tree ----------------------------------------------------------
class TreeGateway(GatewayService):
    """GatewayService running the ``gateway`` package of ``tree`` instead of ROOT's."""

    def __init__(self, config: Path, log_path: Path, tree: Path, *,
                 log_level: str = "INFO") -> None:
        path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
        super().__init__(config, log_path, log_level=log_level, env={"PYTHONPATH": path})
        self.cwd = tree
        self.owner = f"gateway@127.0.0.1:{self.port}"  # how the gateway names itself


def check_tree(tree: Path) -> None:
    """Fail early unless ``gateway`` and ``runners`` resolve to ``tree`` with its env."""
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    code = ("import importlib.util as u; "
            "print(u.find_spec('gateway').origin); print(u.find_spec('runners').origin)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path}, check=True)
    for origin in done.stdout.split():
        if not Path(origin).resolve().is_relative_to(tree):
            raise SystemExit(f"--tree {tree}: the gateway would import {origin}")


def owned_pids(owner: str) -> list[int]:
    """Live processes whose environment carries the gateway's owner mark (as
    tests/conftest.py ``owned_processes`` finds them)."""
    mark = f"{OWNER_ENV}={owner}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def admin_endpoints(url: str) -> list[dict[str, Any]]:
    request = HTTPConnection(urlparse(url).netloc, timeout=10)
    try:
        request.request("GET", "/admin/endpoints",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        resp = request.getresponse()
        body = resp.read()
    finally:
        request.close()
    if resp.status != 200:
        raise RuntimeError(f"/admin/endpoints answered {resp.status}: {body[:300]!r}")
    endpoints: list[dict[str, Any]] = json.loads(body)["endpoints"]
    return endpoints


# -- load ---------------------------------------------------------------------------------
class Answer(NamedTuple):
    sent: float  # seconds since the load started
    done: float
    endpoint: str
    status: int  # 0: transport error
    code: str  # the gateway's error code, or the exception's class for a transport error
    version: str  # X-Model-Version, "" when absent


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


class Client(threading.Thread):
    """One keep-alive connection; a random endpoint per request, back to back."""

    def __init__(self, index: int, url: str, t0: float, stopped: threading.Event,
                 seed: int, timeout: float) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.address = urlparse(url).netloc
        self.t0 = t0
        self.stopped = stopped
        self.rng = random.Random(seed * 1000 + index)
        self.timeout = timeout
        self.answers: list[Answer] = []

    def run(self) -> None:
        conn = HTTPConnection(self.address, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        while not self.stopped.is_set():
            endpoint = self.rng.choice(ENDPOINTS)
            sent = time.monotonic() - self.t0
            try:
                conn.request("POST", f"/models/{endpoint}/invocations", body=BODY,
                             headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, HTTPException) as exc:
                conn.close()  # the next request opens a new connection
                self.answers.append(Answer(sent, time.monotonic() - self.t0, endpoint, 0,
                                           type(exc).__name__, ""))
                continue
            code = "" if resp.status == 200 else _error_code(body)
            self.answers.append(Answer(sent, time.monotonic() - self.t0, endpoint, resp.status,
                                       code, resp.headers.get("X-Model-Version") or ""))
        conn.close()


# -- faults -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    at: float
    endpoint: str
    old: str
    new: str
    kind: str  # flip (good → other good), break (→ broken), restore (broken → good)
    state: str  # the endpoint's state just before the move


@dataclass
class Faults:
    """Performs the scheduled alias moves, SIGKILLs and SIGHUPs; remembers them."""

    gateway: TreeGateway
    tracking_uri: str
    t0: float
    rng: random.Random
    aliases: dict[str, str] = field(default_factory=lambda: {
        f"{m}/{a}": v for m in MODELS for a, v in ALIASES.items()})
    moves: list[Move] = field(default_factory=list)
    kills: list[tuple[float, str, int]] = field(default_factory=list)  # (at, endpoint, pid)
    hups: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def move(self, number: int) -> None:
        broken = [e for e, v in self.aliases.items() if v == BROKEN]
        if broken:  # back to a good version at the next move
            endpoint, kind = broken[0], "restore"
            new = self.rng.choice(GOOD)
        elif number % 3 == 2:
            endpoint, kind, new = self.rng.choice(ENDPOINTS), "break", BROKEN
        else:
            endpoint, kind = self.rng.choice(ENDPOINTS), "flip"
            new = GOOD[1 - GOOD.index(self.aliases[endpoint])]
        name, alias = endpoint.split("/")
        code, body = http(f"{self.gateway.url}/models/{name}/{alias}", timeout=10)
        state = json.loads(body).get("state", "?") if code == 200 else f"HTTP {code}"
        self.client.set_registered_model_alias(name, alias, new)
        # Stamped once the registry has it: a request sent later sees the new version.
        self.moves.append(Move(self.now(), endpoint, self.aliases[endpoint], new, kind, state))
        self.aliases[endpoint] = new
        print(f"    +{self.now():5.1f}s {kind:<7} {endpoint}: v{self.moves[-1].old} → v{new} "
              f"(was {state})", file=sys.stderr, flush=True)

    def kill(self) -> None:
        # When the pool thrashes a runner may be ready for milliseconds only: look again.
        deadline = time.monotonic() + KILL_SEARCH
        while not (live := [e for e in admin_endpoints(self.gateway.url)
                            if e.get("state") == "ready" and e.get("runner")]):
            if time.monotonic() >= deadline:
                self.skipped.append(f"+{self.now():.0f}s SIGKILL: no live runner within "
                                    f"{KILL_SEARCH:.0f} s")
                return
            time.sleep(0.02)
        victim = self.rng.choice(live)
        pid = int(victim["runner"]["pid"])
        endpoint = f"{victim['name']}/{victim['alias']}"
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.skipped.append(f"+{self.now():.0f}s SIGKILL: pid {pid} already gone")
            return
        self.kills.append((self.now(), endpoint, pid))
        print(f"    +{self.now():5.1f}s SIGKILL {endpoint} runner pid {pid}", file=sys.stderr,
              flush=True)

    def hangup(self) -> None:
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.hups.append(self.now())
        print(f"    +{self.now():5.1f}s SIGHUP gateway", file=sys.stderr, flush=True)


def schedule(duration: float, move_every: float, kill_every: float,
             hup_every: float) -> list[tuple[float, str]]:
    """(seconds after the start, what) for every fault before ``duration``, in order."""
    events = []
    for every, what in ((move_every, "move"), (kill_every, "kill"), (hup_every, "hup")):
        if every > 0:
            events += [(every * k, what) for k in range(1, int(duration / every) + 1)
                       if every * k < duration]
    order = {"move": 0, "kill": 1, "hup": 2}
    return sorted(events, key=lambda e: (e[0], order[e[1]]))


# -- the gateway's log --------------------------------------------------------------------
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+) (.*)$")
_READY = re.compile(r"endpoint (\S+) version (\S+) ready on port \d+ in")
_EVICT = re.compile(r"evicting (\S+) version (\S+) \((\w+)\)")


@dataclass
class LogFacts:
    ready_to_eviction: dict[str, list[float]]  # by eviction reason
    levels: Counter[str]
    tracebacks: int
    errors: Counter[str]  # ERROR messages with numbers blanked out
    reloads: int


def read_log(text: str) -> LogFacts:
    """Pair each eviction with its endpoint's last ready line; count what went wrong."""
    ready: dict[str, tuple[datetime, str]] = {}
    spans: dict[str, list[float]] = {}
    levels: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tracebacks = reloads = 0
    for line in text.splitlines():
        if line.startswith("Traceback"):
            tracebacks += 1
        match = _LINE.match(line)
        if not match:
            continue
        stamp, level, _logger, message = match.groups()
        levels[level] += 1
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        if level in ("ERROR", "CRITICAL"):
            errors[re.sub(r"\d+(\.\d+)?", "N", message)[:140]] += 1
        if message.startswith("config reloaded"):
            reloads += 1
        if found := _READY.search(message):
            ready[found[1]] = (when, found[2])
        elif found := _EVICT.search(message):
            seen = ready.pop(found[1], None)
            if seen is not None and seen[1] == found[2]:
                spans.setdefault(found[3], []).append((when - seen[0]).total_seconds())
    return LogFacts(spans, levels, tracebacks, errors, reloads)


# -- the run ------------------------------------------------------------------------------
@dataclass
class Outcome:
    seconds: float
    answers: list[Answer]
    faults: Faults
    before: list[Sample]
    after: list[Sample]
    log: LogFacts
    log_copy: Path | None
    owner_seen: int  # processes with the owner mark seen during the run
    left_at_stop: list[int]
    left_later: list[int]
    exit_code: int | None
    stop_seconds: float


def gateway_config(path: Path, tracking_uri: str, port: int, poll_interval: str,
                   max_runners: int, extra_pool: dict[str, Any]) -> Path:
    return write_config(path, {
        "tracking_uri": tracking_uri, "access_log": False,
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {"admin_tokens": [ADMIN_TOKEN]},
        "pool": {"max_runners": max_runners, **extra_pool},
        "defaults": {"launcher": "fork", "poll_interval": poll_interval},
        "endpoints": [{"name": m, "alias": a} for m in MODELS for a in ALIASES]})


def run(options: Options, *, tree: Path = ROOT, extra_pool: dict[str, Any] | None = None,
        clients: int = CLIENTS, request_timeout: float = REQUEST_TIMEOUT,
        poll_interval: str = "2s", max_runners: int = 3, move_every: float = MOVE_EVERY,
        kill_every: float = KILL_EVERY, hup_every: float = HUP_EVERY, seed: int = 1,
        log_level: str = "INFO") -> str:
    """Soak the gateway of ``tree`` for ``options.duration`` s; returns the markdown report."""
    tree = tree.resolve()
    check_tree(tree)
    extra_pool = extra_pool or {}
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        with stage("building the registry (alpha, beta, gamma: v1, v2, broken v3)"):
            uri = build_registry(work)
        log_path, config = work / "gateway.log", work / "gateway.yaml"
        gateway = TreeGateway(config, log_path, tree, log_level=log_level)
        # Written once the port is known: the owner mark names it, the file repeats it.
        gateway_config(config, uri, gateway.port, poll_interval, max_runners, extra_pool)
        with stage(f"starting the gateway of {tree}"):
            gateway.start()
        try:
            with stage("warming the zygote through alpha/live"):
                status, _ = predict(f"{gateway.url}/models/alpha/live/invocations", BODY,
                                    timeout=300)
                if status != 200:
                    raise RuntimeError(f"alpha/live answered {status}:\n{gateway.tail()}")
            owner_seen = len(wait_until(lambda: owned_pids(gateway.owner), 10,
                                        "processes with the gateway's owner mark"))
            before = scrape(gateway.url)
            t0 = time.monotonic()
            faults = Faults(gateway, uri, t0, random.Random(seed))
            stopped = threading.Event()
            threads = [Client(i, gateway.url, t0, stopped, seed, request_timeout)
                       for i in range(clients)]
            with stage(f"{clients} clients for {options.duration:.0f}s, faults on schedule"):
                for thread in threads:
                    thread.start()
                try:
                    for at, what in schedule(options.duration, move_every, kill_every,
                                             hup_every):
                        time.sleep(max(0.0, t0 + at - time.monotonic()))
                        gateway.check_alive()
                        if what == "move":
                            faults.move(len(faults.moves) + 1)
                        elif what == "kill":
                            faults.kill()
                        else:
                            faults.hangup()
                    time.sleep(max(0.0, t0 + options.duration - time.monotonic()))
                    owner_seen = max(owner_seen, len(owned_pids(gateway.owner)))
                finally:
                    stopped.set()
                    for thread in threads:
                        thread.join(request_timeout + 5)
            seconds = time.monotonic() - t0
            gateway.check_alive()
            after = scrape(gateway.url)
        finally:
            with stage("stopping the gateway"):
                began = time.monotonic()
                gateway.stop()
                stop_seconds = time.monotonic() - began
                left_at_stop = left_later = owned_pids(gateway.owner)
                if left_at_stop:  # the watchdog may still be killing: look again later
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: not owned_pids(gateway.owner), 10,
                                   "no owned process left")
                    left_later = owned_pids(gateway.owner)
                for pid in left_later:  # leave nothing behind, whatever the tree does
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
        text = log_path.read_text(errors="replace")
        copy = None
        with contextlib.suppress(OSError):
            RESULTS.mkdir(parents=True, exist_ok=True)
            copy = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}-gateway.log"
            copy.write_text(text)
        outcome = Outcome(seconds, [a for t in threads for a in t.answers], faults, before,
                          after, read_log(text), copy, owner_seen, left_at_stop, left_later,
                          gateway.proc.returncode if gateway.proc else None, stop_seconds)
    every = (move_every, kill_every, hup_every)
    return render(outcome, tree=tree, extra_pool=extra_pool, clients=clients,
                  request_timeout=request_timeout, poll_interval=poll_interval,
                  max_runners=max_runners, seed=seed, every=every)


# -- the report ---------------------------------------------------------------------------
class Timeline:
    """Where each endpoint's alias pointed at any moment, and the move that put it there."""

    def __init__(self, moves: Sequence[Move]) -> None:
        self.moves: dict[str, list[Move]] = {}
        for move in moves:
            self.moves.setdefault(move.endpoint, []).append(move)
        self.times = {e: [m.at for m in ms] for e, ms in self.moves.items()}

    def last_move(self, endpoint: str, at: float) -> Move | None:
        index = bisect.bisect_right(self.times.get(endpoint, []), at)
        return self.moves[endpoint][index - 1] if index else None

    def version(self, endpoint: str, at: float) -> str:
        move = self.last_move(endpoint, at)
        return move.new if move else ALIASES[endpoint.split("/")[1]]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _delta(after: list[Sample], before: list[Sample], name: str, label: str) -> str:
    now, then = by_label(after, name, label), by_label(before, name, label)
    parts = [f"{k} {v - then.get(k, 0.0):.0f}" for k, v in sorted(now.items())
             if v - then.get(k, 0.0)]
    return ", ".join(parts) or "0"


def _count(n: int, total: int) -> str:
    return f"{n:,} ({100 * n / total:.2f} %)" if total else "0"


def render(o: Outcome, *, tree: Path, extra_pool: dict[str, Any], clients: int,
           request_timeout: float, poll_interval: str, max_runners: int, seed: int,
           every: tuple[float, float, float]) -> str:
    answers, total = o.answers, len(o.answers)
    timeline = Timeline(o.faults.moves)
    status = Counter(a.status for a in answers)
    ok = [a for a in answers if a.status == 200]

    unavailable = [a for a in answers if a.status == 503 and a.code == "runner_unavailable"]
    on_broken, stale, other_unavailable = [], [], []
    for a in unavailable:
        move = timeline.last_move(a.endpoint, a.sent)
        if timeline.version(a.endpoint, a.sent) == BROKEN:
            on_broken.append(a)
        elif move is not None and move.kind == "restore":
            stale.append(a)
        else:
            other_unavailable.append(a)
    kills = o.faults.kills
    blamed = [a for a in answers if a.status == 502 and any(
        e == a.endpoint and k <= a.done <= k + KILL_BLAME for k, e, _ in kills)]
    codes = Counter(f"{a.status} {a.code}" for a in answers if a.status not in (0, 200))
    transport = Counter(a.code for a in answers if a.status == 0)
    stale_200 = [a for a in ok if a.version != timeline.version(a.endpoint, a.sent)
                 and timeline.version(a.endpoint, a.sent) != BROKEN
                 and a.sent - getattr(timeline.last_move(a.endpoint, a.sent), "at", -1e9)
                 >= STALE_AFTER]
    latencies = [1000 * (a.done - a.sent) for a in ok]
    spans = o.log.ready_to_eviction
    all_spans = [s for v in spans.values() for s in v]
    other_status = sum(n for s, n in status.items() if s not in (0, 200, 502, 503, 504))
    busy = sum(1 for a in answers if a.status == 503 and a.code == "pool_busy")
    restarts = (metric(o.after, "model_gateway_runner_restarts_total")
                - metric(o.before, "model_gateway_runner_restarts_total"))

    rows = [
        ["requests", f"{total:,}"],
        ["200", _count(status[200], total)],
        ["502", _count(status[502], total)],
        ["503", _count(status[503], total)],
        ["504", _count(status[504], total)],
        ["other statuses", _count(other_status, total)],
        ["transport errors", _count(status[0], total)
         + (f" ({', '.join(f'{k} {v}' for k, v in transport.most_common())})"
            if transport else "")],
        ["503 runner_unavailable, alias on the broken version", f"{len(on_broken):,}"],
        ["**503 runner_unavailable, alias back on a good version (stale backoff)**",
         f"**{len(stale):,}**"],
        ["503 runner_unavailable, other", f"{len(other_unavailable):,}"],
        ["503 pool_busy", f"{busy:,}"],
        ["502 within 2 s of a SIGKILL of that endpoint's runner / other 502",
         f"{len(blamed):,} / {status[502] - len(blamed):,}"],
        ["failed answers by status and code",
         ", ".join(f"{k} {v:,}" for k, v in codes.most_common()) or "0"],
        [f"200 from a version the alias had left ≥ {STALE_AFTER:.0f} s before",
         f"{len(stale_200):,}"],
        ["successful requests / s", f"{len(ok) / o.seconds:,.1f}"],
        ["latency of 200s p50 / p99 ms",
         f"{_percentile(latencies, 0.5):.1f} / {_percentile(latencies, 0.99):.1f}"],
        ["cold starts (by outcome)", _delta(o.after, o.before,
                                            "model_gateway_cold_starts_total", "outcome")],
        ["evictions (by reason)", _delta(o.after, o.before,
                                         "model_gateway_evictions_total", "reason")],
        ["cutovers (by outcome)", _delta(o.after, o.before,
                                         "model_gateway_cutovers_total", "outcome")],
        ["runner restarts", f"{restarts:.0f}"],
        ["median s from ready to eviction (pairs)",
         f"{median(all_spans):.2f} ({len(all_spans)})"
         + "".join(f"; {r} {median(v):.2f} ({len(v)})" for r, v in sorted(spans.items()))],
        ["alias moves / SIGKILLs / SIGHUPs (config reloads logged)",
         f"{len(o.faults.moves)} / {len(kills)} / {len(o.faults.hups)} ({o.log.reloads})"],
        ["gateway exit code, seconds to stop", f"{o.exit_code}, {o.stop_seconds:.1f}"],
        ["owner-marked processes during the run / left after stop",
         f"{o.owner_seen} / {len(o.left_at_stop)}"
         + (f" (pids {', '.join(map(str, o.left_at_stop))}; {len(o.left_later)} after 10 s)"
            if o.left_at_stop else "")],
    ]

    move_rows = []
    for m in o.faults.moves:
        mine = [a for a in stale if timeline.last_move(a.endpoint, a.sent) is m]
        hits = [a for a in on_broken if timeline.last_move(a.endpoint, a.sent) is m]
        last = f"+{max(a.sent for a in mine) - m.at:.1f}" if mine else "—"
        move_rows.append([f"+{m.at:.0f}", m.endpoint, f"v{m.old} → v{m.new}", m.kind, m.state,
                          str(len(hits)) if m.kind == "break" else "—",
                          str(len(mine)) if m.kind == "restore" else "—",
                          last if m.kind == "restore" else "—"])

    pool = ", ".join(f"{k}: {v}" for k, v in {"max_runners": max_runners, **extra_pool}.items())
    levels = ", ".join(f"{k} {v}" for k, v in sorted(o.log.levels.items()))
    error_lines = "\n".join(f"- {n} × `{msg}`" for msg, n in o.log.errors.most_common(8))
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"### Soak: six endpoints on {max_runners} slots, with faults — {when}\n\n"
        f"Gateway code: `{tree}`. Endpoints {', '.join(ENDPOINTS)} (launcher fork, "
        f"poll_interval {poll_interval}), pool {{{pool}}}, idle_timeout and queue_timeout "
        f"at their defaults. {clients} client threads for {o.seconds:.0f} s, each POSTing a "
        f"1-row prediction to a random endpoint back to back (timeout {request_timeout:.0f} "
        f"s, keep-alive). Faults (seed {seed}): an alias move every {every[0]:.0f} s "
        "(flip v1↔v2; every third move → broken v3, the next one back to a good version), "
        f"a SIGKILL of a live runner every {every[1]:.0f} s, a SIGHUP (reload of the "
        f"unchanged config) every {every[2]:.0f} s. A 503 `runner_unavailable` counts as "
        "*stale backoff* when it was sent after the endpoint's alias had been moved back "
        "from v3 to a good version (and before its next move). Cold starts, evictions, "
        "cutovers and restarts from `/metrics`, before → after the load; ready → eviction "
        "from the gateway's log lines. "
        f"{os.cpu_count()} CPUs, shared machine (noise possible).\n\n"
        + markdown_table(["measure", "value"], rows)
        + "\n\nAlias moves (state: the endpoint's state just before the move; 503s counted "
          "from requests sent while that move was the endpoint's latest):\n\n"
        + markdown_table(["at s", "endpoint", "move", "kind", "state before",
                          "503 while on v3", "stale-backoff 503s after",
                          "last stale 503 at s after the move"], move_rows)
        + f"\n\nSIGKILLs: {', '.join(f'+{k:.0f}s {e} (pid {p})' for k, e, p in kills) or 'none'}"
        + (f"; skipped: {'; '.join(o.faults.skipped)}" if o.faults.skipped else "")
        + f"\n\nGateway log: {levels or 'no lines'}; {o.log.tracebacks} tracebacks of the "
          "gateway itself (runners' output, quoted indented in ERROR lines, not counted)"
        + (f"; kept at `{o.log_copy}`" if o.log_copy else "")
        + (f". ERROR lines (numbers as N):\n\n{error_lines}" if error_lines else ".")
    )


def _pool_item(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip(), yaml.safe_load(value)  # 2s stays a string, 3 an int, true a bool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.set_defaults(duration=300.0)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose gateway is run (default: this one)")
    parser.add_argument("--extra-pool", type=_pool_item, action="append", default=[],
                        metavar="KEY=VALUE", help="another key under pool: (repeatable), "
                        "e.g. min_residency=2s")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="client threads")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT)
    parser.add_argument("--poll-interval", default="2s", help="the endpoints' poll_interval")
    parser.add_argument("--max-runners", type=int, default=3)
    parser.add_argument("--move-every", type=float, default=MOVE_EVERY)
    parser.add_argument("--kill-every", type=float, default=KILL_EVERY)
    parser.add_argument("--hup-every", type=float, default=HUP_EVERY)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="the gateway's log level")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.max_runners < 1 or args.request_timeout <= 0:
        parser.error("--clients, --max-runners and --request-timeout must be positive")
    if not (args.tree / "gateway").is_dir():
        parser.error(f"--tree {args.tree}: no gateway/ package there")
    exit_on_sigterm()
    report = run(options_from(args), tree=args.tree, extra_pool=dict(args.extra_pool),
                 clients=args.clients, request_timeout=args.request_timeout,
                 poll_interval=args.poll_interval, max_runners=args.max_runners,
                 move_every=args.move_every, kill_every=args.kill_every,
                 hup_every=args.hup_every, seed=args.seed, log_level=args.log_level)
    print(report)
    print(f"saved to {save_result('soak', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

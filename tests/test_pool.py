"""The runner pool under pressure: capacity, idle eviction, memory, crashes, hangs, orphans."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import metric, owned_processes, runner_processes, wait_for
from tests.test_follow import Load, X

pytestmark = pytest.mark.slow

ALIASES = ["a", "b", "c"]


class Sampler:
    """Counts this gateway's runner processes every 50 ms while the block runs."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.counts.append(len(runner_processes(self.owner)))
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def const_endpoints(*aliases: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "const", "alias": a, "model_uri": "models:/const/1", **extra}
            for a in aliases]


def test_max_runners_evicts_the_least_recently_used_idle_runner(start_gateway: Any) -> None:
    gw = start_gateway(const_endpoints(*ALIASES), pool={"max_runners": 2, "min_residency": 0})
    with Sampler(gw.owner) as sampler:
        for alias in ["a", "b", "a", "c", "a", "b", "c"]:
            answer = gw.predict("const", alias, X)
            assert answer.status_code == 200, answer.text
            states = {a: gw.status("const", a)["state"] for a in ALIASES}
            assert list(states.values()).count("ready") <= 2
            if alias == "c" and states["a"] == "ready":
                # a was used just before c started: b was the least recently used.
                assert states["b"] == "cold"
    assert max(sampler.counts) <= 2, sampler.counts
    assert metric(gw, "model_gateway_evictions_total", name="const", alias="b",
                  reason="capacity") >= 1
    assert {a: gw.status("const", a)["state"] for a in ALIASES} == {
        "a": "cold", "b": "ready", "c": "ready"}


def test_idle_runners_are_stopped_and_start_again(start_gateway: Any) -> None:
    gw = start_gateway([*const_endpoints("a", "b"), *const_endpoints("pinned", pinned=True)],
                       pool={"idle_timeout": "5s"})
    with ThreadPoolExecutor(3) as pool:  # together: each start takes longer than 5 s
        answers = list(pool.map(lambda a: gw.predict("const", a, X), ["a", "b", "pinned"]))
    assert [a.status_code for a in answers] == [200] * 3
    assert len(runner_processes(gw.owner)) == 3
    time.sleep(10)
    assert len(runner_processes(gw.owner)) == 1  # only the pinned one is left
    assert gw.status("const", "a")["state"] == "cold"
    assert gw.status("const", "pinned")["state"] == "ready"
    assert metric(gw, "model_gateway_evictions_total", name="const", alias="a",
                  reason="idle") == 1
    assert gw.predict("const", "a", X).json() == {"predictions": [1.0]}


def test_memory_limit_evicts_before_starting(start_gateway: Any) -> None:
    # Direct launches: forked runners share pages, so their PSS shrinks as more start and
    # the arithmetic below would depend on how many share.
    gw = start_gateway(const_endpoints(*ALIASES), pool={"max_runners": 8},
                       defaults={"launcher": "direct"})
    assert gw.predict("const", "a", X).status_code == 200
    size = wait_for(lambda: gw.status("const", "a")["runner"]["memory_bytes"], 10)
    assert size > 50 * 2**20, size  # a real scikit-learn runner, measured as PSS
    gw.stop()
    # A budget for two runners of that size, but not three.
    budget = int(size * 2.5)
    gw = start_gateway(const_endpoints(*ALIASES), pool={"memory_limit": budget},
                       defaults={"launcher": "direct"})
    for alias in ALIASES:
        assert gw.predict("const", alias, X).status_code == 200
        wait_for(lambda a=alias: gw.status("const", a)["runner"]["memory_bytes"], 10)
    states = [gw.status("const", a)["state"] for a in ALIASES]
    assert states == ["cold", "ready", "ready"], states
    assert metric(gw, "model_gateway_evictions_total", name="const", alias="a",
                  reason="memory") == 1
    assert metric(gw, "model_gateway_pool_memory_bytes") <= budget


def _not_serving(status: dict[str, Any], pid: int) -> bool:
    """The gateway no longer counts process ``pid`` as the endpoint's ready runner (one
    status read: two could straddle the moment the runner is dropped)."""
    runner = status["runner"]
    return status["state"] != "ready" or runner is None or runner["pid"] != pid


def test_killed_runner_under_load_recovers(start_gateway: Any) -> None:
    gw = start_gateway(const_endpoints("a"))
    assert gw.predict("const", "a", X).status_code == 200
    pid = gw.status("const", "a")["runner"]["pid"]
    with Load(gw, "const", "a", clients=4) as load:
        time.sleep(1)
        killed_at = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        noticed = wait_for(lambda: _not_serving(gw.status("const", "a"), pid), 5)
        noticed_after = time.monotonic() - killed_at
        recovered = wait_for(lambda: any(a[4] > killed_at and a[1] == 200 for a in load.all), 60)
        # The first request sent after the kill that succeeded: the restart was done then.
        back_at = min(a[0] for a in load.all if a[4] > killed_at and a[1] == 200)
        time.sleep(1)
    assert noticed and noticed_after < 3, noticed_after
    assert recovered
    failed = load.failures()
    # Failures: the requests in flight at the kill, and those sent in the instant before
    # the exit was noticed; every request sent after the restart succeeded.
    assert 1 <= len(failed) <= 8, failed
    assert all(a[4] < back_at for a in failed), (failed, back_at)
    assert all(a[1] == 502 for a in failed), failed
    assert len([a for a in load.all if a[4] > back_at]) > 10
    assert gw.status("const", "a")["runner"]["pid"] != pid
    assert metric(gw, "model_gateway_runner_restarts_total", name="const", alias="a") == 1


def test_hung_runner_is_killed_and_replaced(start_gateway: Any) -> None:
    gw = start_gateway(const_endpoints("a"), pool={"health_interval": "1s"})
    assert gw.predict("const", "a", X).status_code == 200
    pid = gw.status("const", "a")["runner"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        status = wait_for(lambda: (s := gw.status("const", "a"))["state"] == "failed" and s, 30)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert status and "hung" in status["last_error"]
    assert wait_for(lambda: not psutil.pid_exists(pid), 5)
    again = gw.predict("const", "a", X)
    assert again.status_code == 200
    assert gw.status("const", "a")["runner"]["pid"] != pid


def test_failing_start_backs_off(start_gateway: Any) -> None:
    gw = start_gateway([{"name": "const", "alias": "broken", "model_uri": "models:/const/3"}])
    answers = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        answers.append(gw.predict("const", "broken", X))
        time.sleep(0.2)
    assert {a.status_code for a in answers} == {503}
    assert all("retry-after" in a.headers for a in answers)
    attempts = metric(gw, "model_gateway_cold_starts_total", name="const", alias="broken",
                      outcome="failed")
    # Each attempt takes seconds and the pauses double: a handful in 8 s, not dozens.
    assert 1 <= attempts <= 4, attempts
    status = gw.status("const", "broken")
    assert status["state"] == "failed" and status["retry_in"] is not None
    assert "model.pkl" in status["last_error"] or "No such file" in status["last_error"]


def test_gateway_sigkill_leaves_no_runner(start_gateway: Any) -> None:
    gw = start_gateway([*const_endpoints("a"), {"name": "const", "alias": "cli",
                                                "model_uri": "models:/const/1", "launcher": "cli"}])
    assert gw.predict("const", "a", X).status_code == 200
    assert gw.predict("const", "cli", X).status_code == 200
    assert len(owned_processes(gw.owner)) >= 4  # runners, uvicorn under the cli, resolver
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(5)
    assert wait_for(lambda: owned_processes(gw.owner) == [], 5), [
        p.cmdline() for p in owned_processes(gw.owner)]


def test_many_endpoints_random_traffic(start_gateway: Any) -> None:
    aliases = [f"m{i}" for i in range(40)]
    gw = start_gateway(const_endpoints(*aliases, startup_timeout="2m"),
                       pool={"max_runners": 4, "queue_timeout": "20s",
                             "memory_limit": "2GiB", "idle_timeout": "30s"})
    rng = random.Random(7)
    stop_at = time.monotonic() + 60
    statuses: list[int] = []
    peak_memory = 0.0
    peak_waiting = 0.0

    def client(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop_at:
            answer = gw.predict("const", local.choice(aliases), X)
            statuses.append(answer.status_code)
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] in ("pool_busy", "runner_unavailable")
                assert "retry-after" in answer.headers

    with Sampler(gw.owner) as sampler, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, rng.randrange(10**6)) for _ in range(4)]
        while time.monotonic() < stop_at:
            peak_memory = max(peak_memory, metric(gw, "model_gateway_pool_memory_bytes"))
            # Nearly every request is a cold start: some always wait for a runner.
            peak_waiting = max(peak_waiting, sum(
                metric(gw, "model_gateway_requests_waiting", name="const", alias=a)
                for a in aliases))
            time.sleep(1)
        for f in futures:
            f.result()
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) >= 8
    assert max(sampler.counts) <= 4, max(sampler.counts)
    assert peak_memory <= 2 * 2**30
    assert peak_waiting >= 1
    assert all(metric(gw, "model_gateway_requests_waiting", name="const", alias=a) == 0
               for a in aliases)  # nothing left counted once the clients are done
    sockets = {e["runner"]["unix_socket"] for e in gw.endpoints() if e["runner"]}
    assert len(sockets) == len(runner_processes(gw.owner))  # no two runners on one socket
    assert gw.stop() == 0
    assert owned_processes(gw.owner) == []
    assert not any(Path(s).exists() for s in sockets)  # every runner socket was removed

"""Progressive rollouts (runners/rollout.py, the endpoint's ROLLING phase, the journal):
the judge on a fake clock, and an endpoint's moves with runners that never start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runners.endpoint import Endpoint, IllegalTransition, Phase
from runners.registry import Resolved
from runners.rollout import Rollout, Tally
from runners.rollout_journal import JOURNAL_FILE, RolloutJournal
from runners.spec import EndpointSpec, RolloutSpec
from tests.runners.test_endpoint import SPEC, V1, V2, runner

FAST = RolloutSpec(steps=(10.0, 50.0, 100.0), step_time=60.0, max_error_rate=0.01,
                   max_latency_ratio=2.0, min_requests=50)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rollout(spec: RolloutSpec = FAST) -> tuple[Rollout, Clock]:
    clock = Clock()
    return Rollout(spec, "2", "1", clock=clock), clock


def feed(r: Rollout, new: int, old: int, *, new_s: float = 0.010, old_s: float = 0.010,
         status: int = 200) -> None:
    for _ in range(new):
        r.observe(True, status, new_s)
    for _ in range(old):
        r.observe(False, 200, old_s)


def test_a_good_version_passes_every_step_after_step_time() -> None:
    r, clock = rollout()
    shares = [r.share]
    for _ in range(3):
        feed(r, 60, 60)
        r.judge()
        assert r.verdict is None and r.share == shares[-1], "a step lasts step_time"
        clock.now += 60
        r.judge()
        shares.append(r.share)
    assert shares == [10, 50, 100, 100]
    assert r.verdict is not None and r.verdict.promoted
    assert r.verdict.reason == "passed all 3 steps"


def test_a_step_waits_for_min_requests_past_step_time() -> None:
    r, clock = rollout()
    feed(r, 49, 400)
    clock.now += 600
    r.judge()
    assert (r.step, r.verdict) == (0, None)
    feed(r, 1, 0)
    r.judge()
    assert r.step == 1 and r.new.requests == 0, "a new step counts afresh"


def test_errors_that_already_cross_the_bound_roll_back_at_once() -> None:
    # 1 % of 50: a single failure is already more than the bound can allow.
    r, _ = rollout()
    feed(r, 3, 30)
    r.observe(True, 500, 0.01)
    assert r.verdict is not None and not r.verdict.promoted
    assert r.share == 0 and not r.routes_new(None)
    assert "1 of 4 requests failed at step 1 (10%)" in r.verdict.reason
    # 10 %: five failures among the first ten are not yet conclusive, a sixth is.
    r, _ = rollout(RolloutSpec(max_error_rate=0.10, min_requests=50))
    for _ in range(5):
        r.observe(True, 503, 0.01)
    assert r.verdict is None
    r.observe(True, None, 0.01)  # unreachable, timed out
    assert r.verdict is not None and not r.verdict.promoted


def test_client_errors_and_old_failures_do_not_count_against_it() -> None:
    r, clock = rollout()
    feed(r, 60, 0, status=400)
    for _ in range(60):
        r.observe(False, 500, 0.01)
    clock.now += 60
    r.judge()
    assert r.verdict is None and r.step == 1
    assert r.describe()["new"]["errors"] == 0


def test_an_error_rate_over_the_bound_after_min_requests_rolls_back() -> None:
    r, _ = rollout(RolloutSpec(max_error_rate=0.05, min_requests=50))
    feed(r, 100, 100)
    for _ in range(8):  # 8 of 108 = 7.4 %; each one alone was not yet conclusive
        r.observe(True, 502, 0.01)
    r.judge()
    assert r.verdict is not None and not r.verdict.promoted


def test_a_slow_version_is_rolled_back_on_its_p95() -> None:
    r, _ = rollout()
    feed(r, 60, 200, new_s=0.050, old_s=0.010)
    r.judge()
    assert r.verdict is not None and not r.verdict.promoted
    assert r.verdict.reason.startswith("p95 latency 50.0 ms is 5.00× the old version's 10.0 ms")


def test_latency_at_the_last_step_is_judged_against_the_last_old_step() -> None:
    r, clock = rollout(RolloutSpec(steps=(50.0, 100.0), step_time=1.0, min_requests=50))
    feed(r, 60, 60, new_s=0.012, old_s=0.010)
    clock.now += 1
    r.judge()
    assert r.share == 100 and r.reference is not None
    feed(r, 60, 0, new_s=0.030)  # no old traffic at 100 %: the 10 ms of the last step
    r.judge()
    assert r.verdict is not None and not r.verdict.promoted
    assert r.latency_ratio() == pytest.approx(3.0)


def test_shares_are_exact_and_sticky_callers_stay_put() -> None:
    r, _ = rollout()
    assert sum(r.routes_new(None) for _ in range(1000)) in range(99, 102)
    sticky, clock = rollout(RolloutSpec(steps=(10.0, 50.0, 100.0), step_time=1.0,
                                        min_requests=1, sticky="X-Customer"))
    callers = [[(b"x-customer", b"c%d" % i)] for i in range(400)]
    seen: list[set[int]] = []
    for _ in range(3):
        on_new = {i for i, h in enumerate(callers) if sticky.routes_new(h)}
        assert on_new == {i for i, h in enumerate(callers) if sticky.routes_new(h)}
        seen.append(on_new)
        feed(sticky, 1, 1)
        clock.now += 1
        sticky.judge()
    assert seen[0] <= seen[1] <= seen[2], "a caller on the new version stays there"
    assert len(seen[2]) == 400 and 20 <= len(seen[0]) <= 60 and 160 <= len(seen[1]) <= 240


def test_the_first_verdict_stands() -> None:
    r, _ = rollout()
    r.promote("promoted by an operator")
    r.roll_back("aborted by an operator")
    feed(r, 100, 0, status=500)
    assert r.verdict is not None and r.verdict.promoted and r.decided.is_set()
    assert r.describe()["verdict"] == "promoted" and r.share == 100


def test_p95_is_the_nearest_rank() -> None:
    t = Tally()
    for ms in range(1, 101):
        t.add(False, ms / 1000)
    assert t.p95() == pytest.approx(0.095)
    assert Tally().p95() is None


# -- the endpoint's ROLLING phase -------------------------------------------------------------
ROLLING = EndpointSpec(name="churn", alias="champion", model_uri="models:/churn@champion",
                       rollout=FAST)


def rolling() -> tuple[Endpoint, Rollout]:
    ep = Endpoint(ROLLING)
    ep.begin_start()
    ep.started(runner("1"), V1)
    cutover = ep.begin_cutover(V2)
    green = runner("2")
    cutover.attach(green)
    cutover.move(Phase.WARMING)
    green.ready_at = 1.0  # as if it answered /ping
    ep.runner.ready_at = 1.0  # type: ignore[union-attr]
    r = Rollout(FAST, "2", "1")
    ep.begin_rollout(cutover, r)
    return ep, r


def test_a_rolling_endpoint_sends_new_requests_by_share_and_counts_answers() -> None:
    ep, r = rolling()
    blue, green = ep.runner, ep.cutover.runner  # type: ignore[union-attr]
    picks = [ep.pick() for _ in range(100)]
    assert picks.count(green) in (9, 10, 11) and picks.count(blue) == 100 - picks.count(green)
    ep.observe(green, 200, 0.01)  # type: ignore[arg-type]
    ep.observe(blue, 200, 0.01)  # type: ignore[arg-type]
    ep.observe(green, 499, 0.01)  # type: ignore[arg-type]  # the caller left: no verdict
    ep.observe(runner("9"), 500, 0.01)  # a runner of neither side
    assert (r.new.requests, r.old.requests, r.new.errors) == (1, 1, 0)
    assert ep.status()["rollout"]["share"] == 10


def test_a_rollback_returns_green_and_remembers_why() -> None:
    ep, r = rolling()
    cutover = ep.cutover
    assert cutover is not None and cutover.phase is Phase.ROLLING
    green = cutover.runner
    r.roll_back("aborted by an operator")
    assert ep.pick() is ep.runner, "no new request reaches a version rolled back"
    assert ep.roll_back(cutover, r.verdict.reason) is green  # type: ignore[union-attr]
    assert ep.cutover is None and ep.version == "1"
    assert ep.status()["rolled_back"] == {"version": "2", "reason": "aborted by an operator"}
    with pytest.raises(IllegalTransition):
        ep.roll_back(cutover, "twice")


def test_a_promoted_rollout_switches_and_a_lost_blue_leaves_green_serving() -> None:
    ep, r = rolling()
    ep.runner_lost(ep.runner, "crashed")  # type: ignore[arg-type]
    green = ep.cutover.runner  # type: ignore[union-attr]
    assert ep.pick() is green and ep.pick() is green
    r.promote("the old version's runner was lost")
    assert ep.switch(ep.cutover, green) is None  # type: ignore[arg-type]
    assert (ep.version, ep.runner, ep.cutover) == ("2", green, None)


# -- the journal ------------------------------------------------------------------------------
def test_the_journal_brings_back_what_served_and_what_was_rolled_back(tmp_path: Path) -> None:
    ep, _ = rolling()
    journal = RolloutJournal(str(tmp_path))
    journal.save(ep)
    saved = json.loads((tmp_path / JOURNAL_FILE).read_text())
    assert saved["churn/champion"]["serving"] == {"version": "1", "uri": "models:/churn/1"}
    assert saved["churn/champion"]["rolling_out"] == "2"
    ep.roll_back(ep.cutover, "too slow")  # type: ignore[arg-type]
    journal.save(ep)

    again = Endpoint(ROLLING)
    RolloutJournal(str(tmp_path)).restore(again)
    assert again.last_good == Resolved("1", "models:/churn/1")
    assert again.rolled_back == ("2", "too slow")
    other = Endpoint(SPEC)  # without a rollout: nothing to restore
    RolloutJournal(str(tmp_path)).restore(other)
    assert other.last_good is None
    moved = Endpoint(EndpointSpec(name="churn", alias="champion", model_uri="models:/x@y",
                                  rollout=FAST))
    RolloutJournal(str(tmp_path)).restore(moved)
    assert moved.last_good is None, "an entry for another model URI is not used"


def test_an_unreadable_journal_is_not_fatal(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_text("[1, 2")
    journal = RolloutJournal(str(tmp_path))
    assert journal.entries == {}
    ep, _ = rolling()
    journal.save(ep)
    assert "churn/champion" in json.loads((tmp_path / JOURNAL_FILE).read_text())

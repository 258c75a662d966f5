"""The endpoint lifecycle (runners/endpoint.py): every legal move, and every illegal one."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from runners.endpoint import (
    PHASES,
    TRANSITIONS,
    Cutover,
    Endpoint,
    Event,
    IllegalTransition,
    Phase,
    State,
)
from runners.launch import LaunchSpec
from runners.registry import Resolved
from runners.runner import Runner
from runners.spec import EndpointSpec

SPEC = EndpointSpec(name="churn", alias="champion", model_uri="models:/churn@champion")
V1, V2 = Resolved("1", "models:/churn/1"), Resolved("2", "models:/churn/2")


async def _no_fork(spec: LaunchSpec) -> object:
    raise AssertionError("no process is started in these tests")


def runner(version: str = "1") -> Runner:
    launch = LaunchSpec(label=SPEC.label, version=version, model_uri=f"models:/churn/{version}",
                        port=1, launcher="fork", env={})
    return Runner(SPEC, launch, _no_fork, model_uri=launch.model_uri)  # type: ignore[arg-type]


def in_state(state: State) -> Endpoint:
    """An endpoint brought to ``state`` through its own methods."""
    ep = Endpoint(SPEC)
    if state is State.COLD:
        return ep
    ep.begin_start()
    if state is State.STARTING:
        return ep
    if state is State.BUILDING_ENV:
        ep.building_env()
        return ep
    if state is State.FAILED:
        ep.start_failed("1", "boom")
        return ep
    ep.started(runner(), V1)
    if state is State.STOPPING:
        ep.begin_stop()
    return ep


def switched(ep: Endpoint) -> None:
    cutover = ep.cutover or ep.begin_cutover(V2)
    cutover.move(Phase.WARMING)
    ep.switch(cutover, runner("2"))


def failed_during_cutover() -> Endpoint:
    """FAILED with a cutover under way: blue died while green was starting."""
    ep = in_state(State.READY)
    ep.begin_cutover(V2)
    assert ep.runner is not None
    ep.runner_lost(ep.runner, "exited")
    return ep


def lost(ep: Endpoint) -> None:
    assert ep.runner is not None
    ep.runner_lost(ep.runner, "exited with code -9")


# (state, event) → (how to get an endpoint in that state, the event's method)
MOVES: dict[tuple[State, Event], tuple[Callable[[], Endpoint], Callable[[Endpoint], object]]] = {
    (State.COLD, Event.START): (lambda: in_state(State.COLD), Endpoint.begin_start),
    (State.STARTING, Event.BUILD_ENV): (lambda: in_state(State.STARTING),
                                        Endpoint.building_env),
    (State.STARTING, Event.READY): (lambda: in_state(State.STARTING),
                                    lambda ep: ep.started(runner(), V1)),
    (State.STARTING, Event.FAIL): (lambda: in_state(State.STARTING),
                                   lambda ep: ep.start_failed("1", "boom")),
    (State.STARTING, Event.ABANDON): (lambda: in_state(State.STARTING),
                                      Endpoint.start_abandoned),
    (State.BUILDING_ENV, Event.ENV_BUILT): (lambda: in_state(State.BUILDING_ENV),
                                            Endpoint.env_built),
    (State.BUILDING_ENV, Event.FAIL): (lambda: in_state(State.BUILDING_ENV),
                                       lambda ep: ep.start_failed("1", "no uv")),
    (State.BUILDING_ENV, Event.ABANDON): (lambda: in_state(State.BUILDING_ENV),
                                          Endpoint.start_abandoned),
    (State.READY, Event.SWITCH): (lambda: in_state(State.READY), switched),
    (State.READY, Event.EVICT): (lambda: in_state(State.READY), Endpoint.evicted),
    (State.READY, Event.LOSE): (lambda: in_state(State.READY), lost),
    (State.READY, Event.STOP): (lambda: in_state(State.READY), Endpoint.begin_stop),
    (State.FAILED, Event.START): (lambda: in_state(State.FAILED), Endpoint.begin_start),
    (State.FAILED, Event.SWITCH): (failed_during_cutover, switched),
    (State.FAILED, Event.RESET): (lambda: in_state(State.FAILED), Endpoint.reset),
    (State.STOPPING, Event.STOPPED): (lambda: in_state(State.STOPPING), Endpoint.stopped),
}


def test_every_legal_transition_has_a_test() -> None:
    legal = {(state, event) for state, events in TRANSITIONS.items() for event in events}
    assert set(MOVES) == legal


@pytest.mark.parametrize(("state", "event"), list(MOVES), ids=lambda s: s.name.lower())
def test_legal_transition(state: State, event: Event) -> None:
    setup, move = MOVES[(state, event)]
    ep = setup()
    assert ep.state is state
    move(ep)
    assert ep.state is TRANSITIONS[state][event]
    assert (ep.runner is not None) == (ep.state is State.READY)


# Every event's method; SWITCH and LOSE need a cutover or a runner and are tested apart.
METHODS: dict[Event, Callable[[Endpoint], object]] = {
    Event.START: Endpoint.begin_start,
    Event.BUILD_ENV: Endpoint.building_env,
    Event.ENV_BUILT: Endpoint.env_built,
    Event.READY: lambda ep: ep.started(runner(), V1),
    Event.FAIL: lambda ep: ep.start_failed("1", "boom"),
    Event.ABANDON: Endpoint.start_abandoned,
    Event.EVICT: Endpoint.evicted,
    Event.STOP: Endpoint.begin_stop,
    Event.STOPPED: Endpoint.stopped,
    Event.RESET: Endpoint.reset,
}


@pytest.mark.parametrize("event", list(METHODS), ids=lambda e: e.name.lower())
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_illegal_transition_raises_and_changes_nothing(event: Event, state: State) -> None:
    if event in TRANSITIONS[state]:
        return  # legal: covered above
    ep = in_state(state)
    runner_before = ep.runner
    with pytest.raises(IllegalTransition,
                       match=f"churn/champion: cannot {event.value} when {state.value}"):
        METHODS[event](ep)
    assert ep.state is state and ep.runner is runner_before


def test_switch_is_legal_only_with_a_warmed_cutover_when_serving_or_failed() -> None:
    for state in (State.COLD, State.STARTING, State.BUILDING_ENV, State.STOPPING):
        ep = in_state(state)
        with pytest.raises(IllegalTransition):
            ep.begin_cutover(V2)
    ep = in_state(State.READY)
    cutover = ep.begin_cutover(V2)
    ep.begin_stop()  # stopped meanwhile: a green runner has nowhere to go
    cutover.move(Phase.WARMING)
    with pytest.raises(IllegalTransition, match="cannot switch to a new version when stopping"):
        ep.switch(cutover, runner("2"))
    assert ep.cutover is cutover and ep.state is State.STOPPING


def test_cutover_phases() -> None:
    legal = {(a, b) for a, targets in PHASES.items() for b in targets}
    assert legal == {(None, Phase.STARTING), (Phase.STARTING, Phase.BUILDING_ENV),
                     (Phase.BUILDING_ENV, Phase.STARTING), (Phase.STARTING, Phase.WARMING),
                     (Phase.WARMING, Phase.ROLLING)}
    ep = in_state(State.READY)
    cutover = ep.begin_cutover(V2)
    assert cutover.phase is Phase.STARTING and ep.status()["pending_version"] == "2"
    with pytest.raises(IllegalTransition, match="another in progress"):
        ep.begin_cutover(V2)
    with pytest.raises(IllegalTransition, match="before warming up"):
        ep.switch(cutover, runner("2"))
    assert ep.cutover is cutover  # an illegal switch changes nothing
    cutover.move(Phase.BUILDING_ENV)
    assert ep.status()["pending_state"] == "building_env"
    with pytest.raises(IllegalTransition, match="from building_env to warming"):
        cutover.move(Phase.WARMING)
    cutover.move(Phase.STARTING)
    cutover.move(Phase.WARMING)
    with pytest.raises(IllegalTransition, match="from warming to starting"):
        cutover.move(Phase.STARTING)
    blue = ep.runner
    green = runner("2")
    assert ep.switch(cutover, green) is blue
    assert ep.runner is green and ep.version == "2" and ep.cutover is None
    assert ep.last_good == Resolved("2", "models:/churn/2")


def test_failed_cutover_keeps_blue_and_backs_off() -> None:
    ep = in_state(State.READY)
    blue = ep.runner
    waits = []
    for _ in range(3):
        waits.append(ep.cutover_failed(ep.begin_cutover(V2), "warm-up answered 500"))
    assert waits == [1.0, 2.0, 4.0]
    assert ep.state is State.READY and ep.runner is blue and ep.version == "1"
    assert ep.failed_version == "2" and "cutover to version 2 failed" in (ep.last_error or "")
    ep.begin_cutover(V2)
    with pytest.raises(IllegalTransition, match="not in progress"):
        ep.cutover_failed(Cutover("churn/champion", V2), "another cutover's failure")


def test_a_fallback_start_keeps_reporting_the_version_that_failed() -> None:
    ep = in_state(State.READY)
    ep.evicted()  # cold, but it remembers v1 served
    ep.begin_start()
    wait = ep.version_failed("2", "v2 does not load")
    assert wait == 1.0 and ep.state is State.STARTING
    ep.started(runner("1"), V1)  # the fallback
    status = ep.status()
    assert status["state"] == "ready" and status["version"] == "1"
    assert status["failed_version"] == "2" and status["last_error"] == "v2 does not load"
    ep.evicted()
    ep.begin_start()
    ep.started(runner("2"), V2)  # the alias's version starts after all
    assert ep.failed_version is None and ep.last_error is None and ep.failures == 0


def test_backoff_only_while_failed_and_a_crash_restarts_at_once() -> None:
    ep = in_state(State.STARTING)
    ep.start_failed("1", "boom")
    assert 0.9 < ep.backing_off() <= 1.0
    ep.begin_start()
    assert ep.backing_off() == 0.0  # STARTING: nothing to wait for
    ep.started(runner(), V1)
    assert ep.runner is not None
    ep.runner_lost(runner(), "not the serving one")  # ignored
    assert ep.state is State.READY
    ep.runner_lost(ep.runner, "exited with code -9")
    assert ep.state is State.FAILED and ep.backing_off() == 0.0
    assert ep.retry_at <= time.monotonic()


def test_status_hides_process_details_unless_asked() -> None:
    ep = in_state(State.READY)
    assert ep.status()["runner"]["port"] == 1
    assert "runner" not in ep.status(details=False)
    ep.version_failed("2", "runner exited with code 1\nlast output:\nTraceback /secret/path")
    assert ep.status()["last_error"].endswith("/secret/path")
    assert ep.status(details=False)["last_error"] == "runner exited with code 1"

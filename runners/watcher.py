"""VersionWatcher: follows aliases and stages, and moves endpoints by blue-green cutover.

When to look: every ``poll_interval`` (±10 %) for endpoints that serve or failed, at
once on a webhook or an admin call. What happens when the target names a new version:

1. Green (the new version) starts beside blue on its own port (a :class:`Cutover`);
   ready = /ping is 200 and, when the model saved an input example, one warm-up
   prediction answered 200.
2. The endpoint switches: requests already bound to blue stay there, new ones go to green.
3. Blue is drained (its in-flight count reaches 0, or ``drain_timeout``) and stopped.

If green fails, blue keeps serving and the version is tried again after a backoff. A
failed endpoint (nothing serving) whose target moves is started again at once.

With a ``rollout`` spec, step 2 is gradual (``rollout.py``): green serves a growing share
beside blue and switches in only after passing every step; a version rolled back is not
tried again until the target moves on or an operator retries it (:meth:`retry`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .endpoint import Cutover, Endpoint, Phase, State
from .errors import ResolveError, RunnerError, RunnerStartError, TransportError
from .pool import RunnerPool
from .registry import Resolved
from .rollout import Rollout
from .runner import Runner
from .spec import EndpointSpec

log = logging.getLogger("model_gateway.watcher")

JITTER = 0.1  # ±10% of poll_interval, so many endpoints do not poll in lockstep
JUDGE_INTERVAL = 0.25  # seconds between a rollout's judgements (errors are judged at once)


class VersionWatcher:
    """Polls endpoints that serve (or failed): a cold one resolves when it starts."""

    def __init__(self, pool: RunnerPool, *, tick: float = 0.5) -> None:
        self.pool = pool
        self.tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="version-watcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- when to look ---------------------------------------------------------------------
    def trigger(self, model_name: str) -> list[Endpoint]:
        """Re-resolve now every endpoint following ``model_name`` (a webhook arrived)."""
        hits = [ep for ep in self.pool.endpoints.values()
                if ep.target.follows and ep.target.name == model_name]
        for ep in hits:
            self.refresh_now(ep)
        return hits

    def refresh_now(self, ep: Endpoint) -> None:
        """Re-resolve one endpoint now, outside its polling schedule."""
        self._schedule_next(ep)
        self.pool.spawn(self.refresh(ep, force=True), f"refresh-{ep.label}")

    def _schedule_next(self, ep: Endpoint) -> None:
        jitter = 1 + random.uniform(-JITTER, JITTER)
        ep.next_poll = time.monotonic() + ep.spec.poll_interval * jitter

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for ep in list(self.pool.endpoints.values()):
                if not ep.target.follows or ep.state not in (State.READY, State.FAILED):
                    ep.next_poll = 0.0
                elif ep.next_poll == 0.0:  # just became ready: it resolved as it started
                    self._schedule_next(ep)
                elif now >= ep.next_poll:
                    self._schedule_next(ep)
                    running = ep.refresh_task
                    if running is None or running.done():  # not during a rollout's minutes
                        self.pool.spawn(self.refresh(ep), f"poll-{ep.label}")

    # -- what to do -----------------------------------------------------------------------
    async def refresh(self, ep: Endpoint, *, force: bool = False) -> None:
        """Re-resolve ``ep``'s target; cut over if it names another version.

        One refresh per endpoint at a time: a second caller waits for the running one.
        ``force`` skips the backoff after a failed cutover (an operator or webhook asked).
        """
        running = ep.refresh_task
        if running is not None and not running.done():
            await asyncio.gather(asyncio.shield(running), return_exceptions=True)
            if not force:
                return
            # A forced refresh (a webhook) must look after the alias moved: the running
            # one may have resolved before. Unless another forced one started meanwhile.
            newer = ep.refresh_task
            if newer is not None and newer is not running and not newer.done():
                await asyncio.shield(newer)
                return
        ep.refresh_task = asyncio.create_task(self._refresh(ep, force),
                                              name=f"refresh-{ep.label}")
        await asyncio.shield(ep.refresh_task)

    async def _refresh(self, ep: Endpoint, force: bool) -> None:
        if not ep.target.follows or ep.state not in (State.READY, State.FAILED):
            return
        ep.last_poll = time.time()
        try:
            resolved = await self.pool.resolve(ep.spec.model_uri, example=True)
        except ResolveError as exc:
            ep.poll_failures += 1
            ep.last_poll_error = str(exc)
            self.pool.events.poll_failure(ep)
            log.warning("endpoint %s: registry poll failed; version %s keeps serving: %s",
                        ep.label, ep.version, exc)
            return
        ep.last_poll_error = None
        if ep.state is State.FAILED:
            if resolved.version != ep.failed_version:  # moved since: start it at once
                self.pool.spawn(self._start(ep), f"start-{ep.label}")
            return
        if resolved.version == ep.version or ep.runner is None:
            return
        if ep.rolled_back is not None and resolved.version == ep.rolled_back[0]:
            return  # until the target moves on, or retry()
        if (not force and resolved.version == ep.failed_version
                and time.monotonic() < ep.retry_at):
            return
        await self._cutover(ep, resolved)

    async def _start(self, ep: Endpoint) -> None:
        try:
            await self.pool.warm(ep)
        except RunnerError as exc:
            log.error("endpoint %s: start after its target moved failed: %s", ep.label, exc)

    async def replace(self, ep: Endpoint, spec: EndpointSpec) -> None:
        """Adopt a changed spec; a live endpoint moves to a runner started from it, blue-green.

        If the new runner fails, the old spec and runner stay in service.
        """
        old = ep.spec
        ep.use_spec(spec)
        if ep.runner is None or ep.state is not State.READY:
            return
        try:
            resolved = await self.pool.resolve(spec.model_uri, example=True)
        except ResolveError as exc:
            ep.use_spec(old)
            ep.last_error = f"config change not applied: cannot resolve {spec.model_uri}: {exc}"
            raise RunnerStartError(ep.last_error) from exc
        await self._cutover(ep, resolved, progressive=False)
        if ep.runner is None or ep.runner.spec is not spec:
            ep.use_spec(old)
            raise RunnerStartError(ep.last_error or "config change not applied")

    def retry(self, ep: Endpoint) -> bool:
        """Forget the version a rollout rolled back and look again now; False when none
        was rolled back."""
        if ep.rolled_back is None:
            return False
        log.info("endpoint %s: version %s may be rolled out again", ep.label,
                 ep.rolled_back[0])
        ep.rolled_back = None
        self.pool.journal.save(ep)
        self.refresh_now(ep)
        return True

    async def _cutover(self, ep: Endpoint, resolved: Resolved, *,
                       progressive: bool = True) -> None:
        """``progressive``: roll out by the endpoint's ``rollout``, if it has one (a
        config change of runner settings cuts over at once: the reload waits for it)."""
        cutover = ep.begin_cutover(resolved)
        log.info("endpoint %s: cutover %s -> %s starting", ep.label, ep.version,
                 resolved.version)
        try:
            green = await self._green(ep, cutover)
            if progressive and ep.spec.rollout is not None and ep.state is State.READY:
                if not await self._roll_out(ep, cutover, green):
                    return
        except RunnerError as exc:
            wait = ep.cutover_failed(cutover, str(exc))
            self.pool.events.cutover(ep, False)
            log.error("endpoint %s: %s (version %s keeps serving; retry in %.0fs)",
                      ep.label, ep.last_error, ep.version, wait)
            return
        except BaseException:
            ep.cutover_cancelled(cutover)
            raise
        if ep.state not in (State.READY, State.FAILED):  # stopped, or cold-started anew
            ep.cutover_cancelled(cutover)
            await green.stop(grace=2)
            return
        blue = ep.switch(cutover, green)
        self.pool.journal.save(ep)
        self.pool.events.cutover(ep, True)
        log.info("endpoint %s: now serving version %s (green ready in %.1fs)", ep.label,
                 resolved.version, time.monotonic() - cutover.began)
        if blue is not None:
            self.pool.spawn(self.pool.drain(blue, ep.spec.drain_timeout), f"drain-{blue.port}")

    async def _roll_out(self, ep: Endpoint, cutover: Cutover, green: Runner) -> bool:
        """Green serves a growing share until judged; True: promoted, switch it in.
        Rolled back: blue serves alone again and green is drained and stopped."""
        assert ep.spec.rollout is not None
        rollout = Rollout(ep.spec.rollout, cutover.version, ep.version)
        try:
            ep.begin_rollout(cutover, rollout)
            self.pool.journal.save(ep)
            log.info("endpoint %s: rolling out version %s: step 1 at %g%%", ep.label,
                     cutover.version, rollout.share)
            while rollout.verdict is None:
                try:
                    await asyncio.wait_for(rollout.decided.wait(), JUDGE_INTERVAL)
                except TimeoutError:
                    pass
                if ep.runner is None or ep.state is not State.READY:
                    rollout.promote("the old version's runner was lost")
                step = rollout.step
                rollout.judge()
                if rollout.step != step:
                    log.info("endpoint %s: version %s passed step %d; now at %g%%",
                             ep.label, cutover.version, step + 1, rollout.share)
        except BaseException:
            await green.stop(grace=2)
            raise
        assert rollout.verdict is not None
        if rollout.verdict.promoted:
            log.info("endpoint %s: version %s promoted: %s", ep.label, cutover.version,
                     rollout.verdict.reason)
            return True
        ep.roll_back(cutover, rollout.verdict.reason)
        self.pool.journal.save(ep)
        self.pool.events.rolled_back(ep)
        log.error("endpoint %s: version %s rolled back: %s (version %s keeps serving)",
                  ep.label, cutover.version, rollout.verdict.reason, ep.version)
        self.pool.spawn(self.pool.drain(green, ep.spec.drain_timeout), f"drain-{green.port}")
        return False

    async def _green(self, ep: Endpoint, cutover: Cutover) -> Runner:
        """Start the cutover's runner and warm it up; it is stopped if anything fails."""
        green = await self.pool.starter.launch(ep, cutover.target, on_phase=cutover.move,
                                               on_runner=cutover.attach)
        try:
            cutover.move(Phase.WARMING)
            if cutover.target.example:
                await _warm_up(green, cutover.target.example)
        except BaseException:
            await green.stop(grace=2)
            raise
        return green


async def _warm_up(runner: Runner, example: str) -> None:
    """One prediction with the model's own input example before traffic moves."""
    try:
        status, body = await runner.client.request(
            "POST", "/invocations", body=example.encode(),
            headers=[(b"content-type", b"application/json")],
            timeout=runner.spec.request_timeout)
    except TransportError as exc:
        raise RunnerStartError(f"warm-up prediction failed: {exc}") from exc
    if status != 200:
        raise RunnerStartError(f"warm-up prediction answered {status}: "
                               f"{body[:300].decode(errors='replace')}")

"""Batcher: merges an endpoint's concurrent prediction requests into one predict call.

MLflow's scoring server runs one ``predict`` per request, and for tabular models most
of that call is fixed cost: sixty-four one-row requests cost about sixty-four times one
sixty-four-row request. A batcher holds an endpoint's prediction requests while its
runner is busy and sends the ones that may share a call (``merging``) as one request.

    a request arrives ──► a call slot is free and nothing waits (max_wait 0)
                            └► served alone on the ordinary path, holding the slot
                          else ──► the queue ──► a slot frees (or max_wait is up):
                                      one request  → served alone, holding the slot
                                      several      → one merged call, split answers
                                      merged call failed, or its answer does not split
                                                   → each served alone

A lone request never waits and is never parsed: batches only form from requests that
queued behind a busy runner. The endpoint has as many call slots as its runner has
workers. A merged call goes to one runner, so a batch never spans two versions.

A slot taken by a request on the ordinary path is handed back by ``ModelProxy.record``,
which every request reaches exactly once; the scope carries it there (``SLOT``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Protocol

from runners import Endpoint, OutgoingRequest, Runner, RunnerPool

from .merging import Payload, Unsplittable, compatible, merge, read, split
from .metrics import GatewayMetrics
from .types import Scope

log = logging.getLogger("model_gateway.batching")

SLOT = "model_gateway.batch_slot"  # scope key: the Batcher whose call slot it holds
SEEN = "model_gateway.batch_seen"  # scope key: the batcher has decided this request's way
MAX_BODY = 64 * 1024  # larger request bodies are served alone
MAX_MERGED = 4 * 2**20  # a merged body stops growing here
RECENT = 100  # calls the status page's mean batch size is taken over


class Member(Protocol):
    """A queued request: the batcher either answers it or lets it go its own way."""

    def alone(self) -> bool:
        """Serve the request on the ordinary path; False when its caller is gone (and
        nothing was started)."""

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
               runner: Runner) -> None:
        """Send the request's part of a merged answer, from ``runner``."""


class _Item:
    __slots__ = ("arrived", "member", "payload", "scope", "size")

    def __init__(self, payload: Payload, member: Member, scope: Scope, size: int) -> None:
        self.payload = payload
        self.member = member
        self.scope = scope
        self.size = size
        self.arrived = time.monotonic()


class _MergedRequest:
    """A merged prediction, for the runner's client (``OutgoingRequest``)."""

    __slots__ = ("content_length", "head", "method")

    def __init__(self, content_type: bytes, request_id: bytes) -> None:
        self.method = "POST"
        self.head = b"POST /invocations HTTP/1.1\r\ncontent-type: %s\r\nx-request-id: %s\r\n" \
            % (content_type, request_id)
        self.content_length: int | None = None


class Batcher:
    """One endpoint's queue of prediction requests and its predict calls in flight."""

    def __init__(self, ep: Endpoint, pool: RunnerPool, metrics: GatewayMetrics) -> None:
        assert ep.spec.batching is not None
        self.ep = ep
        self.spec = ep.spec.batching
        self.pool = pool
        self.slots = ep.spec.workers  # a worker runs one predict call at a time
        self.in_flight = 0
        self.queue: collections.deque[_Item] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sizes: collections.deque[int] = collections.deque(maxlen=RECENT)
        labels = (ep.spec.name, ep.spec.alias)
        self._size_metric = metrics.batch_size.labels(*labels)
        self._batched_metric = metrics.batched.labels(*labels)
        self._fallbacks = metrics.batch_fallbacks

    def offer(self, scope: Scope, content_type: bytes | None, body: bytes,
              member: Member) -> bool:
        """True: the request is queued, and the batcher answers it or lets it go (through
        ``member``). False: serve it now on the ordinary path."""
        scope[SEEN] = True
        if not self.queue and self.in_flight < self.slots and not self.spec.max_wait:
            self._hold(scope)
            return False
        payload = read(content_type, body) if content_type and len(body) <= MAX_BODY \
            else None
        if payload is None:
            self._fallback("not_mergeable", 1)
            return False
        self.queue.append(_Item(payload, member, scope, len(body)))
        self._dispatch()
        return True

    def done(self) -> None:
        """A request that held a call slot on the ordinary path has finished."""
        self.in_flight -= 1
        self._dispatch()

    # -- internals ------------------------------------------------------------------------
    def _hold(self, scope: Scope) -> None:
        self.in_flight += 1
        scope[SLOT] = self
        self._observe(1)

    def _observe(self, size: int) -> None:
        self._size_metric.observe(size)
        sizes = self._sizes
        sizes.append(size)
        self.ep.mean_batch_size = round(sum(sizes) / len(sizes), 2)

    def _fallback(self, reason: str, count: int) -> None:
        self._fallbacks.labels(self.ep.spec.name, self.ep.spec.alias, reason).inc(count)

    def _dispatch(self) -> None:
        """Start calls while slots are free and requests wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.queue and self.in_flight < self.slots:
            wait = self.spec.max_wait
            if wait:
                head = self.queue[0]
                due = head.arrived + wait - time.monotonic()
                if due > 0 and sum(i.payload.key == head.payload.key for i in self.queue) \
                        < self.spec.max_batch_size:
                    self._timer = asyncio.get_running_loop().call_later(due, self._dispatch)
                    return
            batch = self._take()
            if len(batch) == 1:
                item = batch[0]
                self._hold(item.scope)
                if not item.member.alone():
                    item.scope.pop(SLOT, None)
                    self.in_flight -= 1
                continue
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Item]:
        """The queue's first request and, in order, those that may join its call."""
        queue = self.queue
        head = queue.popleft()
        batch, index, size = [head], set[Any](), head.size
        compatible(index, head.payload)
        rest: collections.deque[_Item] = collections.deque()
        while queue and len(batch) < self.spec.max_batch_size:
            item = queue.popleft()
            if item.payload.key == head.payload.key and size + item.size <= MAX_MERGED and \
                    compatible(index, item.payload):
                batch.append(item)
                size += item.size
            else:
                rest.append(item)
        rest.extend(queue)
        self.queue = rest
        return batch

    async def _call(self, batch: list[_Item]) -> None:
        try:
            try:
                runner, status, headers, parts = await self._predict(batch)
            except BaseException as exc:
                # Whatever failed, each request alone gets the answer it would have had.
                reason = exc.reason if isinstance(exc, Unsplittable) else "error"
                if reason == "error":
                    log.warning("merged call to %s failed (%s); serving its %d requests "
                                "alone", self.ep.label, exc or type(exc).__name__, len(batch))
                self._fallback(reason, len(batch))
                for item in batch:
                    item.member.alone()
                if isinstance(exc, Exception):
                    return
                raise
            self._observe(len(batch))
            self._batched_metric.inc(len(batch))
            for item, body in zip(batch, parts, strict=True):
                item.member.answer(status, headers, body, runner)
        finally:
            self.in_flight -= 1
            self._dispatch()

    async def _predict(self, batch: list[_Item]
                       ) -> tuple[Runner, int, list[tuple[bytes, bytes]], list[bytes]]:
        """One merged call: the runner that answered, and each request's answer."""
        first = batch[0].payload
        content_type = first.key[1]
        body = merge(content_type, [item.payload for item in batch])
        ep = self.ep
        runner = await self.pool.acquire(ep)
        try:
            deadline = time.monotonic() + ep.spec.request_timeout
            request: OutgoingRequest = _MergedRequest(content_type, b"batch-%d" % id(batch))
            async with await runner.client.exchange(request, body, deadline) as response:
                answer = response.read_buffered() if response.complete else \
                    await response.read(max(deadline - time.monotonic(), 0.001))
                status, headers = response.status, response.headers
        finally:
            self.pool.release(ep, runner)
        if status != 200:  # a bad payload among them, most likely: MLflow names it alone
            raise Unsplittable("status")
        headers = [h for h in headers if h[0] != b"content-length"]
        return runner, status, headers, split(answer, [item.payload for item in batch])

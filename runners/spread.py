"""Points in [0, 1) that pick a share of requests: evenly spread, or fixed per caller.

Shared by every place that sends a share of traffic somewhere (traffic splits, shadow
copies, inference-log sampling, a rollout's steps).
"""

from __future__ import annotations

import hashlib
import random

GOLDEN = (5**0.5 - 1) / 2  # 0.618…: each step lands in the largest gap left so far


class Spread:
    """Points in [0, 1) along the golden-ratio sequence from a random start: as evenly
    spread as points can be, so a share of them (``sampled``) or a weighted pick is
    within a fraction of a point of its target after a few hundred draws."""

    __slots__ = ("point",)

    def __init__(self) -> None:
        self.point = random.random()  # replicas do not step in lockstep

    def next(self) -> float:
        self.point = (self.point + GOLDEN) % 1.0
        return self.point

    def sampled(self, fraction: float) -> bool:
        return self.next() < fraction


def sticky_point(value: bytes) -> float:
    """A header value's fixed point in [0, 1): the same in every process and replica."""
    digest = hashlib.blake2b(value, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64

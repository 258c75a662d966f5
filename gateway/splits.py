"""Traffic splits: a routing endpoint sends each request to one of its arms by weight.

    - {name: churn, alias: live, traffic: {champion: 90, challenger: 10},
       sticky: X-Customer-Id}

A routing endpoint has no model and no runner: its arms are ordinary declared endpoints
(an alias of the same name, or ``name/alias`` of another), each with its own lazy start,
eviction, cutovers, metrics and status. Callers use the routing endpoint's route and
its api keys; every answer names the arm in ``X-Model-Alias``.

A request goes to an arm by a point in [0, 1). Without ``sticky`` the points follow the
golden-ratio sequence from a random start: spread as evenly as points can be, so the
observed shares match the weights within a fraction of a point after a few hundred
requests, where random draws would still be off by several. With ``sticky`` the point is
a hash of that header's value, the same in every process and replica, so a value always
reaches the same arm while the weights stand. A :class:`Split` is
immutable; new weights (a config reload, ``PUT …/traffic``) replace it whole.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runners.spread import Spread, sticky_point

Key = tuple[str, str]


def arm_key(name: str, arm: str) -> Key:
    """``alias`` (of the routing endpoint's name) or ``name/alias`` → an endpoint key."""
    if "/" in arm:
        other, alias = arm.split("/", 1)
        return (other, alias)
    return (name, arm)


def check_weights(key: Key, weights: Mapping[str, Any], declared: set[Key],
                  routing: set[Key]) -> list[tuple[str | None, str]]:
    """What is wrong with ``weights`` for routing endpoint ``key``, as (the arm, or None
    for the whole, message); empty when they are fine."""
    errors: list[tuple[str | None, str]] = []
    total = 0.0
    for arm, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                weight != weight or weight < 0 or weight == float("inf"):
            errors.append((arm, "a weight must be a number ≥ 0"))
            continue
        total += weight
        target = arm_key(key[0], str(arm))
        if target in routing:
            errors.append((arm, f"{target[0]}/{target[1]} routes traffic itself; an arm must "
                                "serve a model"))
        elif target not in declared:
            errors.append((arm, f"no endpoint {target[0]}/{target[1]} is declared"))
    if not errors and total <= 0:
        errors.append((None, "weights must sum to a positive number"))
    return errors


@dataclass(frozen=True)
class Split:
    key: Key
    arms: tuple[tuple[Key, float], ...]
    sticky: bytes | None = None  # a lower-case header name
    _bounds: tuple[float, ...] = field(default=(), repr=False)
    _spread: Spread = field(default_factory=Spread, repr=False, compare=False)

    @classmethod
    def build(cls, key: Key, weights: Mapping[str, float], sticky: str | None) -> Split:
        """The split of valid ``weights`` (see :func:`check_weights`)."""
        arms = tuple((arm_key(key[0], arm), float(w)) for arm, w in weights.items())
        total = sum(w for _, w in arms)
        bounds, running = [], 0.0
        for _, weight in arms:
            running += weight
            bounds.append(running / total)
        bounds[-1] = 1.0  # no gap at the top from rounding
        return cls(key, arms, sticky.lower().encode() if sticky else None, tuple(bounds))

    def pick(self, headers: list[tuple[bytes, bytes]]) -> Key:
        """The arm for a request with these (lower-case) headers."""
        point = None
        if self.sticky is not None:
            for name, value in headers:
                if name == self.sticky:
                    point = sticky_point(value)
                    break
        if point is None:  # not sticky, or the caller did not send the header
            point = self._spread.next()
        return self.arms[min(bisect.bisect_right(self._bounds, point), len(self.arms) - 1)][0]

    def weights(self) -> dict[str, float]:
        return {_label(self.key, arm): weight for arm, weight in self.arms}

    def describe(self, counts: Mapping[Key, int]) -> dict[str, Any]:
        """Status: weights, and the requests each arm was sent since the gateway started."""
        total = sum(counts.get(arm, 0) for arm, _ in self.arms)
        return {
            "name": self.key[0], "alias": self.key[1], "routing": True,
            "sticky": self.sticky.decode() if self.sticky else None,
            "traffic": self.weights(),
            "arms": [{"arm": _label(self.key, arm), "name": arm[0], "alias": arm[1],
                      "weight": weight, "requests": counts.get(arm, 0),
                      "share": round(counts.get(arm, 0) / total, 4) if total else None}
                     for arm, weight in self.arms],
        }


def _label(key: Key, arm: Key) -> str:
    return arm[1] if arm[0] == key[0] else f"{arm[0]}/{arm[1]}"

"""RolloutJournal: what endpoints with a rollout served, kept across gateway restarts.

A gateway stopped mid-rollout (a SIGTERM, a node drained) restarts with its target
already on the new version. Without a memory of the old one, its first start would put
the new version on all traffic: the very thing the rollout exists to prevent. So for
each endpoint with a rollout, ``<state_dir>/rollouts.json`` keeps the version that last
served alone (``serving``), the one rolling out, and the one rolled back with its reason.
On restart the endpoint starts from ``serving`` and rolls out again from the first step;
a rolled-back version stays rolled back.

The file is written whole (a temporary file renamed over it), only when one of these
changes, never per request. Without ``state_dir`` the journal lives in memory only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .endpoint import Endpoint, Phase
from .registry import Resolved

log = logging.getLogger("model_gateway.pool")

JOURNAL_FILE = "rollouts.json"


class RolloutJournal:
    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE if state_dir else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            try:
                entries = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(entries, dict):
                    raise ValueError("not a JSON object")
                self.entries = entries
            except (OSError, ValueError) as exc:
                log.error("%s cannot be read (%s); rollouts start without it", self.path, exc)

    def restore(self, ep: Endpoint) -> None:
        """Give a new endpoint what its predecessor in the last run served and rolled back."""
        entry = self.entries.get(ep.label)
        if ep.spec.rollout is None or not isinstance(entry, dict) \
                or entry.get("model_uri") != ep.spec.model_uri:
            return
        serving, rolled_back = entry.get("serving"), entry.get("rolled_back")
        if isinstance(serving, dict) and isinstance(serving.get("uri"), str):
            ep.last_good = Resolved(version=serving.get("version"), uri=serving["uri"])
        if isinstance(rolled_back, dict):
            ep.rolled_back = (rolled_back.get("version"), str(rolled_back.get("reason")))

    def save(self, ep: Endpoint) -> None:
        """Record ``ep``'s serving, rolling-out and rolled-back versions (if it rolls out)."""
        if ep.spec.rollout is None:
            return
        cutover = ep.cutover
        good = ep.last_good
        entry = {
            "model_uri": ep.spec.model_uri,
            "serving": None if good is None else {"version": good.version, "uri": good.uri},
            "rolling_out": cutover.version if cutover and cutover.phase is Phase.ROLLING
            else None,
            "rolled_back": None if ep.rolled_back is None else {
                "version": ep.rolled_back[0], "reason": ep.rolled_back[1]},
        }
        if self.entries.get(ep.label) == entry:
            return
        self.entries[ep.label] = entry
        if self.path is None:
            return
        tmp = self.path.with_name(f".{JOURNAL_FILE}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # the rollout goes on; a restart would start afresh
            log.error("cannot write %s: %s", self.path, exc)

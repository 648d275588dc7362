"""Atomic step commit: every member votes, one compare-and-set key decides.

The last voter sets `decision` to "commit"; anyone who learns of a failure sets it to
"abort". Whoever writes first wins, so every survivor reads one outcome and either all
apply the optimizer step or none does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract

COMMIT = "commit"
ABORT = "abort"


class CommitProtocol:
    """Votes and the decision for the steps of one generation."""

    def __init__(
        self,
        store: dist.Store,
        generation: int,
        members: list[int],
        poll_s: float = 0.05,
        abort_check: Callable[[], str | None] | None = None,
    ):
        self.store = store
        self.generation = generation
        self.members = sorted(members)
        self.poll = timedelta(seconds=poll_s)
        self.abort_check = abort_check or (lambda: None)

    def vote(self, worker_id: int, step: int, payload: dict) -> str:
        """Record this rank's vote; block until the step is decided; return the decision."""
        g = self.generation
        self.store.set(contract.vote_key(g, step, worker_id), json.dumps(payload))
        if self.store.add(contract.vote_count_key(g, step), 1) == len(self.members):
            self.store.compare_set(contract.decision_key(g, step), "", COMMIT)
        return self.wait_decision(step)

    def abort(self, step: int, reason: str) -> str:
        """Try to abort `step`; returns the decision that stands (commit may have won)."""
        g = self.generation
        self.store.compare_set(contract.abort_reason_key(g, step), "", reason)
        return self.store.compare_set(contract.decision_key(g, step), "", ABORT).decode()

    def wait_decision(self, step: int) -> str:
        key = contract.decision_key(self.generation, step)
        while True:
            try:
                self.store.wait([key], self.poll)
                return self.store.get(key).decode()
            except dist.DistStoreError:
                reason = self.abort_check()
                if reason:
                    return self.abort(step, reason)

    def votes(self, step: int) -> dict[int, dict]:
        """All members' vote payloads of a decided step (leader only: one round trip)."""
        raw = self.store.multi_get([contract.vote_key(self.generation, step, w)
                                    for w in self.members])
        return {w: json.loads(v) for w, v in zip(self.members, raw)}

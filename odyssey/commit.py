"""Atomic step commit: every member votes, one compare-and-set key decides.

The last voter sets `decision` to "commit"; anyone who learns of a failure sets it to
"abort". Whoever writes first wins, so every survivor reads one outcome and either all
apply the optimizer step or none does.

When a step needs global totals before its update (the gradient norm for clipping, fp16
overflow), the last voter sums them from the votes and writes them into the commit
decision itself (`commit {"sumsq": ..., "overflow": ...}`), so every rank reads the same
numbers in the round trip it makes anyway.
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

    def vote(self, worker_id: int, step: int, payload: dict, totals: bool = False
             ) -> tuple[str, dict | None]:
        """Record this rank's vote; block until the step is decided; return the decision
        and, when `totals` (the same on every member), the step's totals: "sumsq" (sum
        of the votes' "sumsq") and "overflow" (whether any vote has "overflow" set)."""
        g = self.generation
        self.store.set(contract.vote_key(g, step, worker_id), json.dumps(payload))
        if self.store.add(contract.vote_count_key(g, step), 1) == len(self.members):
            value = COMMIT
            if totals:
                votes = self.votes(step).values()  # in member order: one sum everywhere
                value += " " + json.dumps({
                    "sumsq": sum(v.get("sumsq", 0.0) for v in votes),
                    "overflow": any(v.get("overflow", False) for v in votes)})
            self.store.compare_set(contract.decision_key(g, step), "", value)
        decision, _, extra = self.wait_decision(step).partition(" ")
        return decision, (json.loads(extra) if extra and decision == COMMIT else None)

    def abort(self, step: int, reason: str) -> str:
        """Try to abort `step`; returns the decision value that stands (commit, with its
        totals, may have won)."""
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

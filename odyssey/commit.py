"""Atomic step commit: every member votes, one compare-and-set key decides.

The last voter sets `decision` to "commit"; anyone who learns of a failure sets it to
"abort". Whoever writes first wins, so every survivor reads one outcome and either all
apply the optimizer step or none does. On the notify and node control planes a rank
blocks on the decision and its notice watcher writes the abort when a notice arrives (one
wait request per vote, not one per 20 ms slice); under poll it waits in `poll_s` slices
and asks `abort_check` between them.

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

WOKEN_POLL_S = 1.0
"""The decision wait's backstop slice where the notice's watcher wakes it (notify, node)."""

NoticeAction = Callable[[dist.Store, dict], None]
"""What the failure monitor's watcher runs on a notice, with its own store client."""


def abort_step(store: dist.Store, generation: int, step: int, reason: str) -> str:
    """Try to abort `step` of `generation` (its reason first, so a reader of the abort
    finds one); the decision value that stands (a commit that won stays)."""
    store.compare_set(contract.abort_reason_key(generation, step), "", reason)
    return store.compare_set(contract.decision_key(generation, step), "", ABORT).decode()


class CommitProtocol:
    """Votes and the decision for the steps of one generation."""

    def __init__(
        self,
        store: dist.Store,
        generation: int,
        members: list[int],
        poll_s: float = 0.05,
        abort_check: Callable[[], str | None] | None = None,
        on_notice: Callable[[NoticeAction | None], None] | None = None,
        woken_poll_s: float = WOKEN_POLL_S,
        control: Callable[[dist.Store], dict] | None = None,
    ):
        """`on_notice`: registers an action the failure monitor's watcher runs when a
        notice arrives (`FailureMonitor.on_notice`, notify and node planes): with it, a
        rank waits for the decision in `woken_poll_s` slices (a backstop) and the watcher
        aborts the decision to wake it; without it, in `poll_s` slices asking
        `abort_check`. `control`: the last voter calls it (odyssey/step_controls.read)
        and writes its answer into the commit decision; every rank then finds it in
        `last_control`."""
        self.store = store
        self.generation = generation
        self.members = sorted(members)
        self.poll = timedelta(seconds=poll_s)
        self.abort_check = abort_check or (lambda: None)
        self.on_notice = on_notice
        self.woken_poll = timedelta(seconds=max(poll_s, woken_poll_s))
        self.control = control
        self.last_control: dict | None = None
        """`control`'s answer in the last decision this rank read (None: an abort, or
        no decision read yet in this generation)."""

    def vote(self, worker_id: int, step: int, payload: dict, totals: bool = False
             ) -> tuple[str, dict | None]:
        """Record this rank's vote; block until the step is decided; return the decision
        and, when `totals` (the same on every member), the step's totals: "sumsq" (sum
        of the votes' "sumsq") and "overflow" (whether any vote has "overflow" set)."""
        g = self.generation
        self.store.set(contract.vote_key(g, step, worker_id), json.dumps(payload))
        if self.store.add(contract.vote_count_key(g, step), 1) == len(self.members):
            extra: dict = {}
            if totals:
                votes = self.votes(step).values()  # in member order: one sum everywhere
                extra = {"sumsq": sum(v.get("sumsq", 0.0) for v in votes),
                         "overflow": any(v.get("overflow", False) for v in votes)}
            if self.control is not None:
                extra["ctl"] = self.control(self.store)
            value = COMMIT + (" " + json.dumps(extra) if extra else "")
            self.store.compare_set(contract.decision_key(g, step), "", value)
        decision, _, raw = self.wait_decision(step).partition(" ")
        extra = json.loads(raw) if raw and decision == COMMIT else {}
        self.last_control = extra.pop("ctl", None)
        return decision, (extra if totals and extra else None)

    def abort(self, step: int, reason: str) -> str:
        """Try to abort `step`; returns the decision value that stands (commit, with its
        totals, may have won)."""
        return abort_step(self.store, self.generation, step, reason)

    def wait_decision(self, step: int) -> str:
        key = contract.decision_key(self.generation, step)
        poll = self.poll
        if self.on_notice is not None:
            g = self.generation

            def wake(store: dist.Store, notice: dict) -> None:  # the watcher's thread
                if notice["gen"] == g:
                    abort_step(store, g, step, f"{notice['kind']}: {notice['reason']}")

            self.on_notice(wake)
            poll = self.woken_poll
        try:
            # registered: look once before blocking (see FailureMonitor.on_notice)
            reason = self.abort_check() if self.on_notice is not None else None
            while not reason:
                try:
                    self.store.wait([key], poll)
                    return self.store.get(key).decode()
                except dist.DistStoreError:
                    reason = self.abort_check()
            return self.abort(step, reason)
        finally:
            if self.on_notice is not None:
                self.on_notice(None)

    def votes(self, step: int) -> dict[int, dict]:
        """All members' vote payloads of a decided step (leader only: one round trip)."""
        raw = self.store.multi_get([contract.vote_key(self.generation, step, w)
                                    for w in self.members])
        return {w: json.loads(v) for w, v in zip(self.members, raw)}

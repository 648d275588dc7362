"""Fault injection inside a worker: fire each spec at its step and phase.

Specs (kinds, phases, syntax) are defined in :mod:`odyssey.faults`. Besides those given
at launch, a rank picks up requests from `odyssey inject` in the store; under `odyssey
run` it acts only on requests signed with the job token (:mod:`odyssey.control`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from odyssey import contract
from odyssey.control import CommandGate, token_from_env
from odyssey.faults import FaultSpec, InjectedFault
from planner.program import Op

__all__ = ["FaultInjector", "FaultSpec", "InjectedFault", "PHASE_OPS"]

log = logging.getLogger("odyssey.inject")

PHASE_OPS: dict[str, Op | str | None] = {
    "step": None, "forward": Op.FORWARD, "backward": Op.BACKWARD,
    "allreduce": Op.ALLREDUCE, "commit": Op.COMMIT, "migrate": "migrate", "eval": "eval"}
"""The instruction each phase of :data:`odyssey.faults.PHASES` fires before."""


class FaultInjector:
    """Fires this rank's faults once each, at their step and phase."""

    def __init__(self, specs: list[FaultSpec], worker_id: int,
                 on_fire: Callable[[FaultSpec], None] | None = None,
                 token: str | None = None):
        """``token``: the job token requests must be signed with (default: the one the
        launcher exported; none outside `odyssey run`, then requests are taken as is)."""
        self.worker_id = worker_id
        self.pending = [s for s in specs if s.rank == worker_id]
        self.on_fire = on_fire
        self._gate = CommandGate(token if token is not None else token_from_env(), log,
                                 f"rank {worker_id}")
        self._seen = 0

    def poll(self, store, next_step: int) -> None:
        """Pick up requests from `odyssey inject` (one store round trip when none)."""
        count = store.add(contract.INJECT_COUNT, 0)
        while self._seen < count:
            key = contract.inject_key(self._seen)
            if not store.check([key]):
                return  # counted but not written yet: read it at the next step
            self._seen += 1
            text = self._gate.open(key, store.get(key).decode())
            if text is None:
                continue
            try:
                spec = FaultSpec.parse(text)
            except ValueError as err:
                log.warning("rank %d: ignoring %s: %s", self.worker_id, key, err)
                continue
            if spec.rank == self.worker_id:
                self.pending.append(replace(spec, step=max(spec.step, next_step)))

    def before_step(self, step: int) -> None:
        self._fire(step, None)

    def before_op(self, step: int, op: Op) -> None:
        self._fire(step, op)

    def before_migrate(self, resume_step: int) -> None:
        self._fire(resume_step, "migrate")

    def before_eval(self, step: int) -> None:
        self._fire(step, "eval")

    def _fire(self, step: int, op: Op | str | None) -> None:
        for spec in list(self.pending):
            if spec.step == step and PHASE_OPS[spec.phase] is op:
                self.pending.remove(spec)
                if self.on_fire is not None:
                    self.on_fire(spec)  # record the time first: a killed rank says nothing
                spec.fire()

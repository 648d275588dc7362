"""Fault injection inside a worker: fire each spec at its step and phase.

Specs (kinds, phases, syntax) are defined in :mod:`odyssey.faults`. Besides those given
at launch, a rank picks up requests from `odyssey inject` in the store; under `odyssey
run` it acts only on requests signed with the job token (:mod:`odyssey.control`).

A persistent slowdown (``slow:...,factor=F``) is not fired once but applied to every step
in its range (`slowed`): emulated layers sleep F times their time; in real compute each
forward and backward is followed, inside its timed interval, by a sleep of F-1 times its
own measured duration (`after_op`), so the op timings the rank votes with show it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

from odyssey import contract, emulate
from odyssey.control import CommandGate, token_from_env
from odyssey.faults import FaultSpec, InjectedFault
from planner.program import Op

__all__ = ["FaultInjector", "FaultSpec", "InjectedFault", "PHASE_OPS"]

log = logging.getLogger("odyssey.inject")

PHASE_OPS: dict[str, Op | str | None] = {
    "step": None, "forward": Op.FORWARD, "backward": Op.BACKWARD,
    "allreduce": Op.ALLREDUCE, "commit": Op.COMMIT, "migrate": "migrate", "eval": "eval"}
"""The instruction each phase of :data:`odyssey.faults.PHASES` fires before."""
COMPUTE_OPS = (Op.FORWARD, Op.BACKWARD)
"""The instructions a persistent slowdown slows."""


class FaultInjector:
    """Fires this rank's faults once each, at their step and phase."""

    def __init__(self, specs: list[FaultSpec], worker_id: int,
                 on_fire: Callable[[FaultSpec], None] | None = None,
                 token: str | None = None, emulated: bool = False):
        """``token``: the job token requests must be signed with (default: the one the
        launcher exported; none outside `odyssey run`, then requests are taken as is).
        ``emulated``: compute is emulated (slowdowns scale the layers' sleeps)."""
        self.worker_id = worker_id
        mine = [s for s in specs if s.rank == worker_id]
        self.pending = [s for s in mine if not s.persistent]
        self.slowdowns = [s for s in mine if s.persistent]
        """Persistent slowdowns of this rank (each applies to the steps in its range)."""
        self.on_fire = on_fire
        self.emulated = emulated
        self._factor = 1.0  # of the step running now
        self._started: set[FaultSpec] = set()  # slowdowns already reported to on_fire
        self._gate = CommandGate(token if token is not None else token_from_env(), log,
                                 f"rank {worker_id}")
        self._seen = 0

    def poll(self, store, next_step: int, count: int | None = None) -> None:
        """Pick up requests from `odyssey inject`. `count`: the request count the last
        commit decision carried (odyssey/step_controls.read); None: one store round trip
        to read it."""
        if count is None:
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
            if spec.rank != self.worker_id:
                continue
            spec = replace(spec, step=max(spec.step, next_step))
            if not spec.persistent:
                self.pending.append(spec)
            elif spec.until is not None and spec.until <= spec.step:
                log.warning("rank %d: ignoring %s: it ends (until=%d) before step %d",
                            self.worker_id, spec.to_text(), spec.until, spec.step)
            else:
                self.slowdowns.append(spec)

    def compute_factor(self, step: int) -> float:
        """How many times slower this rank's compute is at `step` (1.0: not slowed)."""
        factor = 1.0
        for spec in self.slowdowns:
            factor *= spec.compute_factor(step)
        return factor

    @contextmanager
    def slowed(self, step: int) -> Iterator[None]:
        """Around one step's execution: apply the slowdowns active at `step`."""
        factor = self.compute_factor(step)
        for spec in self.slowdowns:
            if spec not in self._started and spec.compute_factor(step) != 1.0:
                self._started.add(spec)  # the slowdown starts: record it once
                if self.on_fire is not None:
                    self.on_fire(spec)
        self._factor = factor
        try:
            with emulate.compute_scale(factor) if self.emulated else nullcontext():
                yield
        finally:
            self._factor = 1.0

    def after_op(self, step: int, op: Op, seconds: float) -> None:
        """Real compute: stretch a slowed forward/backward to `factor` x its duration."""
        if self._factor != 1.0 and not self.emulated and op in COMPUTE_OPS:
            time.sleep((self._factor - 1.0) * seconds)

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

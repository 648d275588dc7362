"""Fault specs: kill, hang, slow down or raise in a rank at a step and phase.

Spec syntax (also used by `odyssey run --inject`): `KIND:rank=R,step=S[,phase=P][,delay=D]`
e.g. `kill:rank=1,step=6,phase=backward`. Phases name the first instruction of that kind
in the step: forward, backward, allreduce, commit; `step` (default) fires before the step;
`migrate` fires during a recovery that resumes at that step, after the new groups exist.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from odyssey import contract
from planner.program import Op

KINDS = ("kill", "hang", "slow", "raise")
PHASES = {"step": None, "forward": Op.FORWARD, "backward": Op.BACKWARD,
          "allreduce": Op.ALLREDUCE, "commit": Op.COMMIT, "migrate": "migrate"}


class InjectedFault(RuntimeError):
    """Raised by a `raise` fault."""


@dataclass(frozen=True)
class FaultSpec:
    """One fault to inject."""

    kind: str
    """kill (SIGKILL itself), hang (SIGSTOP itself), slow (sleep `delay` s), raise."""
    rank: int
    """Worker id that suffers the fault."""
    step: int
    """Step at which it fires."""
    phase: str = "step"
    """When: step (before it), forward, backward, allreduce, commit, or migrate (during
    a recovery that resumes at `step`)."""
    delay: float = 1.0
    """Seconds of delay for `slow`."""

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> FaultSpec:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"bad fault spec {text!r}: expected KIND:rank=R,step=S with KIND "
                             f"in {KINDS}")
        fields: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq or key not in ("rank", "step", "phase", "delay"):
                raise ValueError(f"bad fault spec {text!r}: unknown or malformed field {part!r}")
            fields[key] = value
        if "rank" not in fields or "step" not in fields:
            raise ValueError(f"bad fault spec {text!r}: rank= and step= are required")
        try:
            spec = cls(kind, int(fields["rank"]), int(fields["step"]),
                       fields.get("phase", "step"), float(fields.get("delay", 1.0)))
        except ValueError as e:
            raise ValueError(f"bad fault spec {text!r}: {e}") from e
        if spec.phase not in PHASES:
            raise ValueError(f"bad fault spec {text!r}: phase must be one of {list(PHASES)}")
        if world_size is not None and not 0 <= spec.rank < world_size:
            raise ValueError(f"bad fault spec {text!r}: rank {spec.rank} is not in the job "
                             f"(ranks 0..{world_size - 1})")
        if spec.step < -1:
            raise ValueError(f"bad fault spec {text!r}: step must be >= 0 (or -1: next step)")
        return spec

    def fire(self) -> None:
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.kind == "slow":
            time.sleep(self.delay)
        else:
            raise InjectedFault(f"injected fault {self}")


class FaultInjector:
    """Fires this rank's faults once each, at their step and phase."""

    def __init__(self, specs: list[FaultSpec], worker_id: int,
                 on_fire: Callable[[FaultSpec], None] | None = None):
        self.worker_id = worker_id
        self.pending = [s for s in specs if s.rank == worker_id]
        self.on_fire = on_fire
        self._seen = 0

    def poll(self, store, next_step: int) -> None:
        """Pick up requests from `odyssey inject` (one store round trip when none)."""
        count = store.add(contract.INJECT_COUNT, 0)
        while self._seen < count:
            text = store.get(contract.inject_key(self._seen)).decode()
            self._seen += 1
            spec = FaultSpec.parse(text)
            if spec.rank == self.worker_id:
                self.pending.append(replace(spec, step=max(spec.step, next_step)))

    def before_step(self, step: int) -> None:
        self._fire(step, None)

    def before_op(self, step: int, op: Op) -> None:
        self._fire(step, op)

    def before_migrate(self, resume_step: int) -> None:
        self._fire(resume_step, "migrate")

    def _fire(self, step: int, op: Op | str | None) -> None:
        for spec in list(self.pending):
            if spec.step == step and PHASES[spec.phase] is op:
                self.pending.remove(spec)
                if self.on_fire is not None:
                    self.on_fire(spec)  # record the time first: a killed rank says nothing
                spec.fire()

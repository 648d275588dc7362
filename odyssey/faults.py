"""Fault specs, the one spelling of what can be injected: kinds, phases, the text syntax.

Spec syntax (``odyssey run ... --inject``, ``odyssey inject``, the store's inject keys):
``KIND:rank=R,step=S[,phase=P][,delay=D]``, e.g. ``kill:rank=1,step=6,phase=backward``.
Phases name the first instruction of that kind in the step: forward, backward, allreduce,
commit; ``step`` (default) fires before the step; ``migrate`` fires during a recovery
that resumes at that step, after the new groups exist; ``eval`` fires as the evaluation
after that step starts (``--eval.every``). ``step=-1`` means the next step
the rank starts.

Torch-free, so the launcher's command line can validate specs without the runtime;
:mod:`odyssey.inject` fires them inside a worker.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

KINDS = ("kill", "hang", "slow", "raise")
"""Faults a rank inflicts on itself."""
LAUNCHER_KINDS = ("rejoin",)
"""Requests the launcher serves instead of a rank (``odyssey inject --kind rejoin``)."""
PHASES = ("step", "forward", "backward", "allreduce", "commit", "migrate", "eval")
"""When in the step a fault fires (see the module docstring)."""
STEP_PHASES = tuple(p for p in PHASES if p not in ("migrate", "eval"))
"""Phases of a step that runs anyway (``migrate`` needs a recovery to happen, ``eval`` an
evaluation)."""
_FIELDS = ("rank", "step", "phase", "delay")


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
    """Step at which it fires (-1: the next step the rank starts)."""
    phase: str = "step"
    """When: step (before it), forward, backward, allreduce, commit, or migrate (during
    a recovery that resumes at `step`)."""
    delay: float = 1.0
    """Seconds of delay for `slow`."""

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> FaultSpec:
        """Parse ``KIND:rank=R,step=S[,phase=P][,delay=D]``; ValueError names the problem."""
        kind, sep, rest = text.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"bad fault spec {text!r}: expected KIND:rank=R,step=S with KIND "
                             f"in {KINDS}")
        fields: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq or key not in _FIELDS:
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

    def to_text(self) -> str:
        """The spec in the syntax :meth:`parse` reads."""
        return (f"{self.kind}:rank={self.rank},step={self.step},phase={self.phase},"
                f"delay={self.delay}")

    def fire(self) -> None:
        """Inflict the fault on the calling process."""
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.kind == "slow":
            time.sleep(self.delay)
        else:
            raise InjectedFault(f"injected fault {self}")

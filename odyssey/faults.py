"""Fault specs, the one spelling of what can be injected: kinds, phases, the text syntax.

Spec syntax (``odyssey run ... --inject``, ``odyssey inject``, the store's inject keys):
``KIND:rank=R,step=S[,phase=P][,delay=D]``, e.g. ``kill:rank=1,step=6,phase=backward``.
Phases name the first instruction of that kind in the step: forward, backward, allreduce,
commit; ``step`` (default) fires before the step; ``migrate`` fires during a recovery
that resumes at that step, after the new groups exist; ``eval`` fires as the evaluation
after that step starts (``--eval.every``). ``step=-1`` means the next step
the rank starts.

Slowness comes in two shapes: ``slow:rank=R,step=S,delay=D`` sleeps D seconds once (a
hiccup), ``slow:rank=R,step=S,factor=F[,until=U]`` makes the rank's compute F times slower
for steps S..U-1 (for good without ``until``): a persistent straggler (a throttled GPU).
Its phase is ignored: every forward and backward of those steps is slowed
(:meth:`FaultSpec.compute_factor`, applied by :mod:`odyssey.inject`).

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
_FIELDS = ("rank", "step", "phase", "delay", "factor", "until")


class InjectedFault(RuntimeError):
    """Raised by a `raise` fault."""


@dataclass(frozen=True)
class FaultSpec:
    """One fault to inject."""

    kind: str
    """kill (SIGKILL itself), hang (SIGSTOP itself), slow (sleep `delay` s once, or compute
    `factor` x slower), raise."""
    rank: int
    """Worker id that suffers the fault."""
    step: int
    """Step at which it fires (-1: the next step the rank starts)."""
    phase: str = "step"
    """When: step (before it), forward, backward, allreduce, commit, or migrate (during
    a recovery that resumes at `step`)."""
    delay: float = 1.0
    """Seconds of delay for a one-off `slow`."""
    factor: float | None = None
    """Persistent `slow`: forward and backward take `factor` (>= 1) times as long from
    `step` on; None for every other fault."""
    until: int | None = None
    """Persistent `slow`: the first step no longer slowed (None: slowed to the end)."""

    @property
    def persistent(self) -> bool:
        """A slowdown that lasts steps (``factor=``), not a one-off event."""
        return self.factor is not None

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> FaultSpec:
        """Parse ``KIND:rank=R,step=S[,phase=P][,delay=D|,factor=F[,until=U]]``;
        ValueError names the problem."""
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
        if "factor" in fields and "delay" in fields:
            raise ValueError(f"bad fault spec {text!r}: give delay= (one sleep) or factor= "
                             "(persistent slowdown), not both")
        try:
            spec = cls(kind, int(fields["rank"]), int(fields["step"]),
                       fields.get("phase", "step"), float(fields.get("delay", 1.0)),
                       float(fields["factor"]) if "factor" in fields else None,
                       int(fields["until"]) if "until" in fields else None)
        except ValueError as e:
            raise ValueError(f"bad fault spec {text!r}: {e}") from e
        try:
            return spec.check(world_size)
        except ValueError as e:
            raise ValueError(f"bad fault spec {text!r}: {e}") from None

    def check(self, world_size: int | None = None) -> FaultSpec:
        """The spec itself if it is valid (for a job of `world_size` ranks, if given);
        ValueError names the problem."""
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}")
        if world_size is not None and not 0 <= self.rank < world_size:
            raise ValueError(f"rank {self.rank} is not in the job (ranks 0..{world_size - 1})")
        if self.step < -1:
            raise ValueError("step must be >= 0 (or -1: next step)")
        if self.kind == "slow" and self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")
        if self.factor is None:
            if self.until is not None:
                raise ValueError("until= needs factor= (a persistent slowdown)")
            return self
        if self.kind != "slow":
            raise ValueError(f"factor= is for slow faults, not {self.kind}")
        if not self.factor >= 1:  # also refuses nan
            raise ValueError(f"factor must be >= 1 (F times slower), got {self.factor}")
        if self.until is not None and self.until <= self.step:
            raise ValueError(f"until must be > step (the first step no longer slowed), got "
                             f"step={self.step} until={self.until}")
        return self

    def to_text(self) -> str:
        """The spec in the syntax :meth:`parse` reads."""
        text = f"{self.kind}:rank={self.rank},step={self.step},phase={self.phase}"
        if self.factor is None:
            return f"{text},delay={self.delay}"
        return f"{text},factor={self.factor}" + (
            "" if self.until is None else f",until={self.until}")

    def compute_factor(self, step: int) -> float:
        """How many times slower this spec makes `step`'s compute (1.0: not at all)."""
        if self.factor is None or step < self.step:
            return 1.0
        return self.factor if self.until is None or step < self.until else 1.0

    def fire(self) -> None:
        """Inflict a one-off fault on the calling process."""
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.kind == "slow":
            time.sleep(self.delay)
        else:
            raise InjectedFault(f"injected fault {self}")

"""`RecoveryDecision`: what the leader chose for one membership change, and why.

The leader builds it after scoring every candidate and publishes it (as JSON) for the
other members; everyone then runs `chosen`. The recovery event in the report is made
from it, so it keeps what the event tells: the candidates with their scores, the kinds
that were infeasible, who was lost or joined, and when each step of the decision ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.recovery import RecoveryCandidate

SWITCH = "switch"
"""`RecoveryDecision.policy` of a two-phase switch (the plan its background copy was for)."""


@dataclass
class RecoveryDecision:
    """The published choice that creates one generation."""

    generation: int
    """The generation this decision creates."""
    chosen: RecoveryCandidate
    """The candidate every member runs next (plan, transfers or checkpoint reload)."""
    policy: str
    """The recovery policy that chose it (adaptive or a fixed kind)."""
    horizon_s: float
    """Horizon the candidates were scored over."""
    members: list[int]
    """Ranks of the new generation."""
    committed_step: int
    """Last step every surviving member applied (-1: none yet)."""
    agreed_at: float
    """Wall time the members were fixed (end of agreement)."""
    decided_at: float
    """Wall time the leader published this decision (end of planning)."""
    candidates: list[dict] = field(default_factory=list)
    """`RecoveryCandidate.row()` of every feasible candidate, best score first."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Why each infeasible kind was dropped."""
    ranks_lost: list[int] = field(default_factory=list)
    """Ranks of the last trained plan that are not members any more."""
    newcomers: list[int] = field(default_factory=list)
    """Replacement workers that join with this generation."""
    interrupted: int = 0
    """Recoveries abandoned on the way to this one (a failure during recovery)."""
    swap_host_Bps: float | None = None
    """The copy bandwidth swapping was priced at (measured online once ranks swapped,
    else at the start-up calibration); None: swapping was not priced."""

    def to_dict(self) -> dict:
        return {"generation": self.generation, "chosen": self.chosen.to_dict(),
                "policy": self.policy, "horizon_s": self.horizon_s, "members": self.members,
                "committed_step": self.committed_step, "agreed_at": self.agreed_at,
                "decided_at": self.decided_at, "candidates": self.candidates,
                "dropped": self.dropped, "ranks_lost": self.ranks_lost,
                "newcomers": self.newcomers, "interrupted": self.interrupted,
                "swap_host_Bps": self.swap_host_Bps}

    @classmethod
    def from_dict(cls, d: dict) -> RecoveryDecision:
        return cls(**{**d, "chosen": RecoveryCandidate.from_dict(d["chosen"])})

"""What a `Trainer` tells its hooks: each instruction, each committed step, each recovery,
the end of `fit`.

Telemetry (`odyssey.telemetry`) is one hook; benchmarks and tools pass their own
(`Trainer(..., hooks=[...])`) instead of patching the engine or the trainer. A hook
overrides only what it needs; `on_op` is registered on the engine (`Engine.add_op_hook`)
only for hooks that override it, so the step loop pays nothing for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from odyssey.engine import OpTiming, StepResult
from planner.decision import RecoveryDecision
from planner.plan import Plan


@dataclass(frozen=True)
class CommittedStep:
    """A step every member of the generation applied."""

    step: int
    generation: int
    plan: Plan
    """The plan that ran it."""
    members: list[int]
    rank: int
    """The rank telling (hooks run on every rank)."""
    result: StepResult
    """This rank's view of the step (op seconds, its share of loss and samples)."""
    committed_at: float
    """`time.perf_counter()` when this rank's `run_step` returned (the step committed)."""
    step_s: float
    """Wall time since the previous commit (a redone step after a recovery: since the
    recovery ended); what metrics.jsonl records."""
    votes: dict[int, dict] | None
    """Every member's vote (loss_sum, samples, timing), read by the leader; None on the
    other ranks."""

    @property
    def leader(self) -> bool:
        return self.votes is not None

    @property
    def loss(self) -> float | None:
        """The global mean loss (leader only)."""
        if self.votes is None:
            return None
        return sum(v["loss_sum"] for v in self.votes.values()) / self.plan.global_batch


@dataclass(frozen=True)
class Recovery:
    """A membership change this rank recovered from."""

    generation: int
    """The generation the recovery created."""
    decision: RecoveryDecision
    resume_step: int
    """The first step the new generation runs."""


@dataclass
class FitResult:
    """What `Trainer.fit` returns on each rank."""

    worker_id: int
    steps_run: int
    losses: dict[int, float] = field(default_factory=dict)
    """Per-step global loss (leader only)."""
    report: dict | None = None
    """report.json content (leader only)."""


class TrainerHook:
    """Override what you need; every method does nothing here."""

    def on_op(self, op: OpTiming) -> None:
        """After each instruction this rank executed (inside the timed step)."""

    def on_step_committed(self, step: CommittedStep) -> None:
        """After each committed step, before the next one starts."""

    def on_recovered(self, recovery: Recovery) -> None:
        """After this rank switched to a new generation's plan, before its first step."""

    def on_fit_end(self, result: FitResult) -> None:
        """When `fit` is about to return (after the report is written)."""


def overrides_on_op(hook: TrainerHook) -> bool:
    """Whether `hook` wants per-instruction timings."""
    return type(hook).on_op is not TrainerHook.on_op

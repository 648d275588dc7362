"""What a `Trainer` tells its hooks: each instruction, each committed step, each
evaluation, each recovery, the end of `fit`.

User callbacks override `on_step_end` and `on_eval`, and log their own scalars with
`step.log_scalar(name, value)` / `result.log_scalar(...)`: the leader writes them into
that step's metrics.jsonl record (or that evaluation's eval.jsonl record), TensorBoard
and the report, beside the built-in ones.

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
    data_wait_s: float = 0.0
    """Seconds this rank's step waited for its batches (0 on ranks that load none)."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Scalars hooks logged for this step (`log_scalar`)."""

    def log_scalar(self, name: str, value: float) -> None:
        """Add `name` to this step's metrics record (written by the leader: log global
        values, or values every rank agrees on; other ranks' are not written)."""
        self.scalars[_scalar_name(name)] = float(value)

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
class EvalResult:
    """A finished evaluation: the validation loss every member agreed on."""

    step: int
    """The step after whose commit it ran."""
    generation: int
    rank: int
    """The rank telling (hooks run on every rank; all see the same loss)."""
    loss: float
    """Mean per-sample validation loss."""
    samples: int
    """Validation samples it covered."""
    seconds: float
    """Wall time it took on this rank."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Scalars hooks logged with it (`log_scalar`)."""

    def log_scalar(self, name: str, value: float) -> None:
        """Add `name` to this evaluation's eval.jsonl record (leader's value written)."""
        self.scalars[_scalar_name(name)] = float(value)


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
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss after each evaluated step (every rank)."""
    report: dict | None = None
    """report.json content (leader only)."""


class TrainerHook:
    """Override what you need; every method does nothing here."""

    def on_op(self, op: OpTiming) -> None:
        """After each instruction this rank executed (inside the timed step)."""

    def on_step_committed(self, step: CommittedStep) -> None:
        """After each committed step, before the next one starts."""

    def on_step_end(self, step: CommittedStep) -> None:
        """After every hook's `on_step_committed`, before the step's metrics record is
        written: user callbacks; `step.log_scalar` adds to that record."""

    def on_eval(self, result: EvalResult) -> None:
        """After each evaluation (`--eval.every`), on every rank, with the same loss."""

    def on_recovered(self, recovery: Recovery) -> None:
        """After this rank switched to a new generation's plan, before its first step."""

    def on_fit_end(self, result: FitResult) -> None:
        """When `fit` is about to return (after the report is written)."""


def overrides_on_op(hook: TrainerHook) -> bool:
    """Whether `hook` wants per-instruction timings."""
    return type(hook).on_op is not TrainerHook.on_op


RESERVED_SCALARS = ("time", "step", "loss", "step_time_s", "samples_per_s", "mode", "gen",
                    "world", "data_wait_s", "lr", "grad_norm", "loss_scale", "skipped",
                    "val_loss", "samples", "eval_s")
"""Names the built-in records use; `log_scalar` refuses them."""


def _scalar_name(name: str) -> str:
    if not name or name in RESERVED_SCALARS:
        raise ValueError(f"scalar name {name!r} is empty or taken by a built-in metric "
                         f"({', '.join(RESERVED_SCALARS)})")
    return name

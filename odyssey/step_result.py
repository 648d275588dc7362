"""What one executed step and one executed instruction look like from outside the engine:
`StepResult` (what `Engine.run_step` returns), `OpTiming` (what an op hook gets) and the
recipe's per-step metrics (`step_metrics`, for metrics.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.program import Instruction


@dataclass
class StepResult:
    """What one rank observed while executing one step."""

    step: int
    decision: str
    loss_sum: float = 0.0
    """Sum of per-sample losses this rank computed (last stages only)."""
    sample_ids: list[int] = field(default_factory=list)
    """Sample ids whose loss this rank computed."""
    op_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time spent per op kind (for calibration)."""
    seconds: float = 0.0
    lr: float = 0.0
    """The learning rate of this step."""
    grad_norm: float | None = None
    """The global gradient norm before clipping (when clipping or fp16 is on)."""
    skipped: bool = False
    """fp16: a gradient overflowed somewhere, so no rank applied this step."""
    loss_scale: float = 1.0
    """The loss scale this step ran with (fp16; 1.0 otherwise)."""


def step_metrics(result: StepResult, votes: dict[int, dict] | None) -> dict:
    """The recipe's per-step metrics for metrics.jsonl: lr, the global gradient norm
    before clipping (from the votes when the step did not need it), and under fp16 the
    loss scale and whether the step was skipped."""
    out: dict = {"lr": result.lr}
    if result.grad_norm is not None:
        out["grad_norm"] = result.grad_norm
    elif votes and not result.skipped:
        out["grad_norm"] = sum(v.get("sumsq", 0.0) for v in votes.values()) ** 0.5
    if result.loss_scale != 1.0 or result.skipped:
        out.update(loss_scale=result.loss_scale, skipped=result.skipped)
    return out


@dataclass(frozen=True)
class OpTiming:
    """One executed instruction, as an op hook sees it (`Engine.add_op_hook`)."""

    step: int
    instruction: Instruction
    start_s: float
    """`time.perf_counter()` when it started (CLOCK_MONOTONIC on Linux: one clock for
    every process of a host)."""
    end_s: float
    """`time.perf_counter()` when it returned."""
    thread_cpu_s: float
    """CPU seconds of the executing thread spent in it (`time.thread_time`)."""

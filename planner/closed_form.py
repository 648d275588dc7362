"""Closed-form step-time estimates, for pruning plan candidates fast.

1F1B:  sum_s (f_s + b_s) + (m - 1) * max_s (f_s + b_s) + 2 * sum(hop p2p)
GPipe: sum_s (f_s + b_s) + (m - 1) * (max_s f_s + max_s b_s) + 2 * sum(hop p2p)
Ring all-reduce: 2(n-1)/n * bytes/beta + 2(n-1) * alpha.
Step: slowest pipeline + exposed all-reduce phase + commit + slowest optimizer step.
The all-reduce phase starts each stage when its last backward is done (stage s ends
sum_{j<s}(b_j + hop_j) before stage 0) and runs the groups in order, latest layers
first, each starting when all its members finished their previous one.

With uniform stages and free p2p both pipeline formulas are exact (the simulator
reproduces them); p2p latency can add stalls the formula does not see, so it is a
slight underestimate then (see docs/performance-model.md for measured error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.cost import CostModel
from planner.plan import Plan
from planner.reduce import layer_groups


def ring_allreduce_s(nbytes: float, n: int, alpha_s: float, beta_Bps: float) -> float:
    """Ring all-reduce time of nbytes over n ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / beta_Bps + 2 * (n - 1) * alpha_s


def pipeline_terms(schedule: str, fwd: Sequence[float], bwd: Sequence[float],
                   hops: Sequence[float] = ()) -> tuple[float, float]:
    """(fixed, per_microbatch): a pipeline's time for m microbatches is
    fixed + m * per_microbatch."""
    total = sum(fwd) + sum(bwd) + 2 * sum(hops)
    if schedule == "1f1b":
        per = max(f + b for f, b in zip(fwd, bwd))
    elif schedule == "gpipe":
        per = max(fwd) + max(bwd)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return total - per, per


def pipeline_s(schedule: str, fwd: Sequence[float], bwd: Sequence[float], m: int,
               hops: Sequence[float] = ()) -> float:
    """Closed-form time of one pipeline running m microbatches."""
    fixed, per = pipeline_terms(schedule, fwd, bwd, hops)
    return fixed + m * per


@dataclass(frozen=True)
class Estimate:
    """A closed-form step-time estimate and its parts (seconds)."""

    step_s: float
    """Total."""
    pipeline_s: float
    """Slowest pipeline (compute + p2p on the critical path)."""
    allreduce_s: float
    """All-reduce time exposed after the slowest pipeline ends."""
    commit_s: float
    """Commit."""
    optimizer_s: float
    """Slowest optimizer step."""


def estimate_plan(plan: Plan, cost: CostModel) -> Estimate:
    """Closed-form estimate of a `Plan` under a `CostModel`."""
    mb = plan.microbatch_size
    worst_pipe = 0.0
    ready: dict[int, float] = {}
    for pipe in plan.pipelines:
        fwd = [cost.forward_s(st.start, st.end, mb) * cost.speed_factor(st.rank)
               for st in pipe.stages]
        bwd = [cost.backward_s(st.start, st.end, mb) * cost.speed_factor(st.rank)
               for st in pipe.stages]
        hops = [cost.p2p_s(a.rank, b.rank, cost.boundary_bytes(a.end - 1, mb))
                for a, b in zip(pipe.stages, pipe.stages[1:])]
        t = pipeline_s(plan.schedule, fwd, bwd, len(pipe.microbatches), hops)
        worst_pipe = max(worst_pipe, t)
        for st, off in zip(pipe.stages, finish_offsets(bwd, hops)):
            ready[st.rank] = t - off
    for (a, b), members in sorted(layer_groups(plan), key=lambda g: -g[0][0]):
        if len(members) > 1:  # latest layers first; a group waits for its members
            end = (max(ready[r] for r in members)
                   + cost.allreduce_s(members, cost.grad_bytes(a, b)))
            for r in members:
                ready[r] = end
    ar = max(max(ready.values(), default=0.0) - worst_pipe, 0.0)
    opt = max((cost.optimizer_s(st.start, st.end) for p in plan.pipelines for st in p.stages),
              default=0.0)
    commit = cost.commit_s()
    return Estimate(worst_pipe + ar + commit + opt, worst_pipe, ar, commit, opt)


def finish_offsets(bwd: Sequence[float], hops: Sequence[float] = ()) -> list[float]:
    """How long before the pipeline's end each stage finishes: the last gradient still
    has to flow back through the earlier stages (offset_s = sum_{j<s} b_j + hop_j)."""
    out, acc = [], 0.0
    hops = list(hops) + [0.0] * (len(bwd) - len(hops))
    for b, h in zip(bwd, hops):
        out.append(acc)
        acc += b + h
    return out

"""Straggler mitigation: the plan to run around slow ranks, chosen by the cost model.

When the straggler detector's set of slow ranks changes (one found, one cleared), the
leader tells the step-time predictor each slow rank's measured factor
(`planner.cost.CostModel.slowdown`) and asks `plan_mitigation` what to run next.
Candidates are `RecoveryCandidate`s, scored over the horizon like recoveries
(`planner.recovery.score`):

- keep: the current plan, no switch;
- rebalance: the same stages with the microbatches re-dealt across pipelines, so a
  pipeline with a slow stage trains fewer and the others more. No state moves, the
  global batch and its samples stay the same. With no slow rank left, the best
  rebalance is the even split: the way back to the failure-free plan.

A switch is taken only when it beats keeping the plan by `StragglerConfig.min_gain` in
predicted step time and by score (its switch cost included): hysteresis, so noise in
the factor never makes the plan flap. Torch-free: the live leader and the cluster
simulator call the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from planner.partition import assign_microbatches, split_microbatches
from planner.placement import RecoveryContext, transfers
from planner.plan import Pipeline, Plan
from planner.recovery import RecoveryCandidate, RecoveryConfig, score


def with_counts(plan: Plan, counts: list[int]) -> Plan:
    """`plan`'s stages with pipeline i training counts[i] microbatches (ids dealt as
    `Plan.uniform` deals them, so equal counts give the uniform plan back)."""
    if len(counts) != len(plan.pipelines) or sum(counts) != plan.num_microbatches:
        raise ValueError(f"counts {counts} do not deal {plan.num_microbatches} microbatches "
                         f"to {len(plan.pipelines)} pipelines")
    pipes = [Pipeline(list(p.stages), mbs)
             for p, mbs in zip(plan.pipelines, assign_microbatches(counts))]
    return Plan(plan.num_layers, plan.num_microbatches, plan.microbatch_size, pipes,
                plan.schedule).validate()


def counts_of(plan: Plan) -> list[int]:
    """Microbatches per pipeline."""
    return [len(p.microbatches) for p in plan.pipelines]


def rebalanced(plan: Plan, predict: Callable[[Plan], float], max_moves: int = 64) -> Plan:
    """The microbatch split of `plan`'s pipelines with the least predicted step time.

    Starts from the split that evens out each pipeline's own predicted time (two small
    predictions per pipeline: with one and two microbatches), then moves one
    microbatch at a time between the slowest and the fastest pipelines while the full
    plan's prediction improves (all-reduce and fill/drain included)."""
    m, k = plan.num_microbatches, len(plan.pipelines)
    if k == 1:
        return plan
    per, fixed = [], []
    for p in plan.pipelines:
        one, two = (predict(Plan(plan.num_layers, n, plan.microbatch_size,
                                 [Pipeline(list(p.stages), list(range(n)))], plan.schedule))
                    for n in (1, 2))
        per.append(max(two - one, 1e-12))
        fixed.append(one - per[-1])
    counts = split_microbatches(m, per, fixed)
    best = with_counts(plan, counts)
    best_s = predict(best)
    for _ in range(max_moves):
        own = [fixed[i] + counts[i] * per[i] for i in range(k)]
        order = sorted(range(k), key=lambda i: own[i])
        moves = [(src, dst) for src in reversed(order[-2:]) for dst in order[:2]
                 if src != dst and counts[src] > 1]
        improved = False
        for src, dst in moves:
            trial = list(counts)
            trial[src] -= 1
            trial[dst] += 1
            cand = with_counts(plan, trial)
            t = predict(cand)
            if t < best_s * (1 - 1e-9):
                best, best_s, counts, improved = cand, t, trial, True
                break
        if not improved:
            break
    return best


@dataclass
class MitigationChoice:
    """What `plan_mitigation` found: the candidate to run and every one it scored."""

    chosen: RecoveryCandidate
    candidates: list[RecoveryCandidate]

    @property
    def switch(self) -> bool:
        """Whether the chosen plan differs from the current one."""
        return self.chosen.kind != "keep"

    def rows(self) -> list[dict]:
        return [c.row() for c in sorted(self.candidates, key=lambda c: -c.score)]


def plan_mitigation(ctx: RecoveryContext, predict: Callable[[Plan], float],
                    recovery: RecoveryConfig, min_gain: float) -> MitigationChoice:
    """Keep `ctx.old_plan` or rebalance it; `predict` must already know the slow ranks.

    `ctx.members` are the current plan's ranks (nobody is lost)."""
    plan, resume = ctx.old_plan, ctx.committed_step + 1
    keep = RecoveryCandidate("keep", plan, resume_step=resume,
                             note=f"microbatches {counts_of(plan)}")
    cands = [keep]
    new = rebalanced(plan, predict)
    if counts_of(new) != counts_of(plan):
        cands.append(RecoveryCandidate("rebalance", new, transfers=transfers(ctx, new),
                                       resume_step=resume,
                                       note=f"microbatches {counts_of(plan)} -> "
                                            f"{counts_of(new)}"))
    score(cands, ctx, recovery, predict)
    keep.predicted_transition_s = 0.0  # no switch, no cost
    keep.score = recovery.horizon_s / keep.predicted_step_s * plan.global_batch
    best = max(cands, key=lambda c: c.score)
    if best is not keep and keep.predicted_step_s < best.predicted_step_s * min_gain:
        best = keep  # not worth a switch: hysteresis against flapping
    return MitigationChoice(best, cands)

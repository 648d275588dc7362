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
- repartition: inside each pipeline holding a slow rank, the layers re-split by
  predicted time with that rank's factor (`planner.partition.Partitioner` weighted by
  each stage's speed: contiguous stages, the slow one gets fewer layers); every other
  pipeline keeps its stages, except that one re-split earlier and no longer slow goes
  back to its layout in `home` (the plan before mitigation). Its layers move to their
  new holders (`planner.placement.transfers`), a transition priced like a recovery's.
- repartition+rebalance: that, with the microbatches re-dealt on top.
- park: the slow ranks (never the caller's leader) leave the plan but stay in the job:
  the survivors' ``reroute`` recovery (`planner.recovery`: a pipeline missing a stage
  sends its microbatches through another pipeline's holder of those layers), built by
  the caller's `recover` and scored with the step in flight the switch aborts. Nothing
  moves; a parked rank probes its speed and rejoins once it is fast again, so it is
  reversible and needs no bar beyond `min_gain`.
- drop: the slow ranks leave (fenced, as if lost) and the survivors recover without
  them: the recovery candidate the failure's own decision would choose
  (`planner.recovery.choose`), built by the caller's `recover` (the live leader's
  builder, memory and swapping included), scored with its transition plus the step in
  flight that the fence aborts. Only offered when the caller can fence ranks (a
  launcher that kills them), and irreversible, so it must also beat every in-place
  candidate by `drop_gain` in predicted step time.

A switch is taken only when it beats keeping the plan by `StragglerConfig.min_gain` in
predicted step time and by score (its switch cost included): hysteresis, so noise in
the factor never makes the plan flap. Torch-free: the live leader and the cluster
simulator call the same functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from planner.cost import CostModel
from planner.memory import inflight_microbatches
from planner.partition import assign_microbatches, split_microbatches
from planner.placement import RecoveryContext, transfers
from planner.plan import Pipeline, Plan, PlanError, Stage
from planner.recovery import RecoveryCandidate, RecoveryConfig, choose, score

RecoverWithout = Callable[[RecoveryContext], list[RecoveryCandidate]]
"""The caller's (unscored) recovery candidates for a context: `build_candidates` with its
memory model and swap pricing, what a drop recovers with."""


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


def layouts_of(plan: Plan) -> list[list[int]]:
    """Each pipeline's stage boundaries [0, b1, ..., num_layers]."""
    return [[p.stages[0].start] + [st.end for st in p.stages] for p in plan.pipelines]


def repartitioned(plan: Plan, cost: CostModel, home: Plan | None = None,
                  memory_limit: float = math.inf) -> Plan:
    """`plan` with each pipeline holding a slow rank (`cost.speed_factor` > 1) re-split
    so its slowest stage, factor included, is as fast as it can be; a pipeline with no
    slow rank keeps its stages, or takes back its layout in `home` (same ranks in the
    same order: the way back once a straggler is cleared). Microbatches are unchanged.
    A pipeline with no partition under `memory_limit` keeps its stages, and so does one
    with a rank that also serves another pipeline (a rerouted stage: its layer range is
    tied to that pipeline's, and a rank executes one stage)."""
    m = plan.num_microbatches
    part = cost.partitioner(plan.microbatch_size)
    back = {tuple(p.ranks): p.stages for p in home.pipelines} if home is not None else {}
    uses = Counter(r for p in plan.pipelines for r in p.ranks)
    pipes = []
    for p in plan.pipelines:
        ranks, stages = p.ranks, list(p.stages)
        speed = [cost.speed_factor(r) for r in ranks]
        if any(uses[r] > 1 for r in ranks):
            pipes.append(p)  # shares a rank with another pipeline: keeps its boundaries
            continue
        if max(speed) > 1.0:
            inflight = [inflight_microbatches(plan.schedule, len(ranks), s, m)
                        for s in range(len(ranks))]
            bounds = part.solve_weighted(len(ranks), inflight, memory_limit, speed,
                                         near=[stages[0].start] + [st.end for st in stages])
            if bounds is not None:
                stages = [Stage(r, a, b) for r, a, b in zip(ranks, bounds, bounds[1:])]
        elif tuple(ranks) in back:
            stages = list(back[tuple(ranks)])
        pipes.append(Pipeline(stages, list(p.microbatches)))
    return Plan(plan.num_layers, plan.num_microbatches, plan.microbatch_size, pipes,
                plan.schedule).validate()


@dataclass
class MitigationChoice:
    """What `plan_mitigation` found: the candidate to run and every one it scored."""

    chosen: RecoveryCandidate
    candidates: list[RecoveryCandidate]
    leaving: list[int] = dataclasses.field(default_factory=list)
    """The ranks a chosen ``drop`` takes out of the job, or a chosen ``park`` out of the
    plan (empty for any other kind)."""

    @property
    def switch(self) -> bool:
        """Whether the chosen plan differs from the current one."""
        return self.chosen.kind != "keep"

    def rows(self) -> list[dict]:
        return [c.row() for c in sorted(self.candidates, key=lambda c: -c.score)]


def plan_mitigation(ctx: RecoveryContext, predict: Callable[[Plan], float],
                    recovery: RecoveryConfig, min_gain: float, cost: CostModel | None = None,
                    home: Plan | None = None, memory_limit: float = math.inf,
                    recover: RecoverWithout | None = None, drop_gain: float = 1.25,
                    can_drop: bool = True, parkable: list[int] | None = None
                    ) -> MitigationChoice:
    """Keep `ctx.old_plan`, rebalance it, (with `cost`) re-partition it, or (with `cost`
    and `recover`) drop its slow ranks; `predict` and `cost` must already know the slow
    ranks (`CostModel.slowdown`).

    `ctx.members` are the current plan's ranks (nobody is lost); `home`: the plan
    before mitigation, whose layouts re-split pipelines go back to once no longer slow;
    `drop_gain`: how much faster than the best in-place candidate a drop must be;
    `can_drop`: offer the drop (with `recover`); `parkable`: the ranks that may be parked
    (with `recover`; None: parking off)."""
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
    if cost is not None:
        cands += _repartitions(ctx, predict, cost, home, memory_limit)
    score(cands, ctx, recovery, predict)
    keep.predicted_transition_s = 0.0  # no switch, no cost
    keep.score = recovery.horizon_s / keep.predicted_step_s * plan.global_batch
    in_place = max(cands, key=lambda c: c.score)
    slow = sorted(r for r in plan.ranks if cost is not None and cost.speed_factor(r) > 1)
    park = [r for r in slow if r in (parkable or [])]
    if recover is not None and park:
        cand = parked(ctx, park, recover, recovery, predict, keep.predicted_step_s)
        if cand is not None:
            cands.append(cand)
            in_place = max(in_place, cand, key=lambda c: c.score)  # reversible too
    if recover is not None and slow and can_drop:
        drop = dropped(ctx, slow, recover, recovery, predict, keep.predicted_step_s)
        if drop is not None:
            cands.append(drop)
    best = max(cands, key=lambda c: c.score)
    if best.kind == "drop" and in_place.predicted_step_s < best.predicted_step_s * drop_gain:
        best = in_place  # irreversible: only when it clearly beats working around them
    if home is not None and cost is not None and not any(
            cost.speed_factor(r) > 1 for r in plan.ranks):
        # nobody slow: back to the plan before mitigation unless another beats it clearly
        # (layouts the noisy online profile cannot tell apart must not stay)
        back = next((c for c in cands if c.plan.to_dict() == home.to_dict()), None)
        if back is not None and back.predicted_step_s < best.predicted_step_s * min_gain:
            best = back
    if best is not keep and keep.predicted_step_s < best.predicted_step_s * min_gain:
        best = keep  # not worth a switch: hysteresis against flapping
    leaving = slow if best.kind == "drop" else park if best.kind == "park" else []
    return MitigationChoice(best, cands, leaving)


def _repartitions(ctx: RecoveryContext, predict: Callable[[Plan], float], cost: CostModel,
                  home: Plan | None, memory_limit: float) -> list[RecoveryCandidate]:
    """repartition and repartition+rebalance, when the layout changes."""
    plan, resume = ctx.old_plan, ctx.committed_step + 1
    if home is not None and home.ranks != plan.ranks:
        home = None  # a failure changed the ranks since: nothing to go back to
    split = repartitioned(plan, cost, home, memory_limit)
    if layouts_of(split) == layouts_of(plan):
        return []
    out = []
    note = f"stages {layouts_of(plan)} -> {layouts_of(split)}"
    for kind, cand in (("repartition", split),
                       ("repartition+rebalance", rebalanced(split, predict))):
        if kind != "repartition" and counts_of(cand) == counts_of(split):
            continue
        try:
            moves = transfers(ctx, cand)
        except PlanError:  # a layer with no holder to fetch from: cannot happen in place
            continue
        extra = "" if kind == "repartition" else (
            f", microbatches {counts_of(plan)} -> {counts_of(cand)}")
        out.append(RecoveryCandidate(kind, cand, transfers=moves, resume_step=resume,
                                     note=note + extra))
    return out


def _without(ctx: RecoveryContext, gone: list[int], recover: RecoverWithout,
             recovery: RecoveryConfig, predict: Callable[[Plan], float]
             ) -> list[RecoveryCandidate]:
    """The recovery candidates, scored, once `gone` leave the plan."""
    without = RecoveryContext(ctx.old_plan, [r for r in ctx.members if r not in gone],
                              ctx.committed_step, ctx.layer_bytes, ctx.checkpoint_step)
    cands = recover(without) if without.members else []
    score(cands, without, recovery, predict)
    return cands


def _leaving(then: RecoveryCandidate, kind: str, recovery: RecoveryConfig,
             keep_step_s: float, note: str) -> RecoveryCandidate:
    """`then` as a mitigation that takes ranks out: its transition plus the aborted
    step in flight (`keep_step_s`), scored over the horizon."""
    transition = then.predicted_transition_s + keep_step_s
    useful = max(0.0, recovery.horizon_s - transition)
    return dataclasses.replace(
        then, kind=kind, predicted_transition_s=transition,
        score=useful / then.predicted_step_s * then.plan.global_batch, note=note)


def parked(ctx: RecoveryContext, slow: list[int], recover: RecoverWithout,
           recovery: RecoveryConfig, predict: Callable[[Plan], float], keep_step_s: float
           ) -> RecoveryCandidate | None:
    """The survivors' reroute once `slow` leave the plan, as a ``park`` candidate (None:
    no reroute covers their stages)."""
    cands = _without(ctx, slow, recover, recovery, predict)
    reroute = [c for c in cands if c.kind == "reroute" and not c.transfers]
    if not reroute:
        return None
    then = max(reroute, key=lambda c: c.score)
    return _leaving(then, "park", recovery, keep_step_s,
                    f"rank(s) {slow} parked, their stages rerouted through replicas: "
                    f"{then.note}")


def dropped(ctx: RecoveryContext, slow: list[int], recover: RecoverWithout,
            recovery: RecoveryConfig, predict: Callable[[Plan], float], keep_step_s: float
            ) -> RecoveryCandidate | None:
    """The plan the survivors would recover with once `slow` leave (None: none is
    feasible), as a ``drop`` candidate: the failure's decision over the same builder,
    its transition plus the aborted step in flight (`keep_step_s`)."""
    cands = _without(ctx, slow, recover, recovery, predict)
    if not cands:
        return None
    then = choose(cands, recovery)
    return _leaving(then, "drop", recovery, keep_step_s,
                    f"rank(s) {slow} leave, then {then.kind}: {then.note}")

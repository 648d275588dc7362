"""Recovery candidates for a membership change, and the choice between them.

Every candidate is a full `Plan` plus a transition (layer transfers, or a checkpoint
reload). The choice maximises work over a horizon H, the expected time until the next
change: samples = (H - transition) / step_time x global batch. Kinds:

- reroute (ReCycle): a lost stage's microbatches go to the same stage of another
  pipeline (a shared stage); nothing moves, that peer carries more load.
- redundant (Bamboo): a neighbour stage of the broken pipeline adopts the lost stage's
  layers, fetched from a surviving replica; instant-ish switch, slower stage.
- reparallelize (Oobleck): fresh pipelines for the survivors (unequal lengths allowed),
  layers and optimizer state fetched from surviving replicas.
- restart: the same fresh plan, state reloaded from the last checkpoint; steps after
  it are redone. The fallback when some layer has no surviving replica.
- two-phase: reroute at once, copy a reparallelized plan's state in the background
  while the rerouted plan trains, switch to it at a step boundary once the copy is done
  (`then`); scored over the horizon with both phases (`two_phase`).
Upward changes (a replacement worker joins) re-plan through reparallelize.

Fresh plans and state transfers come from `planner.placement`; the live coordinator and
the cluster simulator both call `build_candidates`, `score` and `choose` here. Given a
memory model, `build_candidates` predicts every candidate's per-rank peak
(`planner.memory.plan_memory`) and drops those over the device capacity; a transition
is predicted from its transfers' conflict-free rounds (`planner.placement.rounds_s`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from planner.memory import (
    MemoryModel,
    PeakMemory,
    RankSteps,
    SwapNeed,
    SwapPricing,
    peak_memory,
    peak_of,
    plan_memory,
    swap_floor,
    swap_need,
)
from planner.partition import Partitioner
from planner.placement import (
    PredictLength,
    RecoveryContext,
    Transfer,
    balanced_split,
    fresh_plans,
    rounds_s,
    transfers,
)
from planner.plan import Pipeline, Plan, PlanError, Stage
from planner.recovery_config import POLICIES, RecoveryConfig
from profiler.units import format_size


@dataclass
class RecoveryCandidate:
    """A recovery option with its predictions."""

    kind: str
    plan: Plan
    transfers: list[Transfer] = field(default_factory=list)
    from_checkpoint: bool = False
    resume_step: int = 0
    """First step the new plan runs."""
    lost_steps: int = 0
    """Committed steps that must be redone (restart only)."""
    predicted_transition_s: float = 0.0
    predicted_step_s: float = 0.0
    score: float = 0.0
    """Samples trained over the horizon."""
    note: str = ""
    peak_bytes: float = 0.0
    """Predicted peak memory of the fullest rank (0: not predicted)."""
    peak_rank: int = -1
    """That rank."""
    fits: bool = True
    """Whether `peak_bytes` is within the device capacity (without swapping)."""
    swap_s: float = 0.0
    """Step time swapping adds (in `predicted_step_s`; 0: no swapping)."""
    swap_budgets: dict[int, float] = field(default_factory=dict)
    """Saved-activation bytes each rank that must swap to fit may keep resident: its
    Chameleon budget while this plan runs (empty: none swaps)."""
    floor_bytes: float = 0.0
    """Least per-rank capacity it fits in with swapping (0: swapping not priced)."""
    then: RecoveryCandidate | None = None
    """two-phase: the plan switched to once its transfers (copied in the background
    while this candidate's plan trains) are done."""
    background_s: float = 0.0
    """two-phase: predicted duration of that background copy."""
    shadow_bytes: dict[int, float] = field(default_factory=dict)
    """two-phase: state bytes each receiving rank holds beside its stage while the copy
    runs (in `peak_bytes`)."""

    def row(self) -> dict:
        extra = {}
        if self.then is not None:
            extra = {"background_s": self.background_s, "then": self.then.row(),
                     "shadow_bytes": max(self.shadow_bytes.values(), default=0.0)}
        return {**extra, "kind": self.kind, "predicted_transition_s": self.predicted_transition_s,
                "predicted_step_s": self.predicted_step_s, "score": self.score,
                "lost_steps": self.lost_steps, "transfers": len(self.transfers),
                "transfer_rounds": len({t.round for t in self.transfers}),
                "moved_bytes": sum(t.nbytes for t in self.transfers), "note": self.note,
                "pipelines": [len(p.stages) for p in self.plan.pipelines],
                "peak_bytes": self.peak_bytes, "peak_rank": self.peak_rank,
                "fits": self.fits, "swap_s": self.swap_s,
                "swap_ranks": len(self.swap_budgets), "floor_bytes": self.floor_bytes}

    def to_dict(self) -> dict:
        d = self.row()
        d.update(plan=self.plan.to_dict(), resume_step=self.resume_step,
                 from_checkpoint=self.from_checkpoint,
                 transfers=[asdict(t) for t in self.transfers],
                 swap_budgets={str(r): b for r, b in self.swap_budgets.items()})
        if self.then is not None:
            d.update(then=self.then.to_dict(),
                     shadow_bytes={str(r): b for r, b in self.shadow_bytes.items()})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RecoveryCandidate:
        return cls(kind=d["kind"], plan=Plan.from_dict(d["plan"]),
                   transfers=[Transfer(**t) for t in d["transfers"]],
                   from_checkpoint=d["from_checkpoint"], resume_step=d["resume_step"],
                   lost_steps=d["lost_steps"],
                   predicted_transition_s=d["predicted_transition_s"],
                   predicted_step_s=d["predicted_step_s"], score=d["score"], note=d["note"],
                   peak_bytes=d.get("peak_bytes", 0.0), peak_rank=d.get("peak_rank", -1),
                   fits=d.get("fits", True), swap_s=d.get("swap_s", 0.0),
                   swap_budgets={int(r): b for r, b in d.get("swap_budgets", {}).items()},
                   floor_bytes=d.get("floor_bytes", 0.0),
                   then=cls.from_dict(d["then"]) if d.get("then") else None,
                   background_s=d.get("background_s", 0.0),
                   shadow_bytes={int(r): b for r, b in d.get("shadow_bytes", {}).items()})

    @property
    def background_transfers(self) -> list[Transfer]:
        """two-phase: the state copied while this plan trains (empty otherwise)."""
        return self.then.transfers if self.then is not None else []


# ---- candidate builders -------------------------------------------------------------
def reroute(ctx: RecoveryContext) -> RecoveryCandidate:
    old, dead = ctx.old_plan, ctx.dead
    if ctx.newcomers:
        raise PlanError("reroute only handles lost ranks, not newcomers")
    load = Counter(s.rank for p in old.pipelines for s in p.stages)  # pipelines served
    pipelines = []
    for pi, p in enumerate(old.pipelines):
        stages = []
        for st in p.stages:
            if st.rank not in dead:
                stages.append(st)
                continue
            peers = [q.stages[si].rank for qi, q in enumerate(old.pipelines) if qi != pi
                     for si in range(len(q.stages))
                     if (q.stages[si].start, q.stages[si].end) == (st.start, st.end)
                     and q.stages[si].rank not in dead]
            if not peers:
                raise PlanError(f"reroute: no surviving peer holds layers "
                                f"{st.start}..{st.end - 1} with the same boundaries")
            peer = min(peers, key=lambda r: (load[r], r))
            load[peer] += 1
            stages.append(Stage(peer, st.start, st.end))
        pipelines.append(Pipeline(stages, list(p.microbatches)))
    plan = Plan(old.num_layers, old.num_microbatches, old.microbatch_size, pipelines,
                old.schedule).validate()
    return RecoveryCandidate("reroute", plan, resume_step=ctx.committed_step + 1,
                             note="lost stages served by peers of other pipelines")


def redundant(ctx: RecoveryContext) -> RecoveryCandidate:
    old, dead = ctx.old_plan, ctx.dead
    if ctx.newcomers:
        raise PlanError("redundant compute only handles lost ranks, not newcomers")
    pipelines, orphans = [], []
    for p in old.pipelines:
        alive = [s for s in p.stages if s.rank not in dead]
        if not alive:
            orphans.extend(p.microbatches)
            continue
        # each surviving stage grows to cover the lost stages before the next survivor;
        # lost stages at the front go to the first survivor
        stages = []
        for i, st in enumerate(alive):
            start = 0 if i == 0 else st.start
            end = alive[i + 1].start if i + 1 < len(alive) else old.num_layers
            stages.append(Stage(st.rank, start, end))
        pipelines.append(Pipeline(stages, list(p.microbatches)))
    if not pipelines:
        raise PlanError("redundant compute: every pipeline lost all its stages")
    for j, m in enumerate(orphans):
        pipelines[j % len(pipelines)].microbatches.append(m)
    for p in pipelines:
        p.microbatches.sort()
    plan = Plan(old.num_layers, old.num_microbatches, old.microbatch_size, pipelines,
                old.schedule).validate()
    return RecoveryCandidate("redundant", plan, transfers=transfers(ctx, plan),
                             resume_step=ctx.committed_step + 1,
                             note="neighbour stages adopt the lost layers")


def reparallelize(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
                  fresh: list[Plan] | None = None) -> list[RecoveryCandidate]:
    """One candidate per fresh plan (`fresh`, default `fresh_plans(ctx, predict)`) whose
    layers all have a surviving replica to fetch from."""
    out = []
    for plan in fresh_plans(ctx, predict) if fresh is None else fresh:
        try:
            out.append(RecoveryCandidate("reparallelize", plan, transfers=transfers(ctx, plan),
                                         resume_step=ctx.committed_step + 1,
                                         note=f"{len(plan.pipelines)} new pipeline(s)"))
        except PlanError:
            continue
    if not out:
        raise PlanError("reparallelize: some layer has no surviving replica")
    return out


def restart(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
            fresh: list[Plan] | None = None) -> list[RecoveryCandidate]:
    """One candidate per fresh plan, state reloaded from the latest checkpoint."""
    step = ctx.checkpoint_step
    resume = 0 if step is None else step + 1
    note = "no checkpoint: from initialisation" if step is None else f"checkpoint of step {step}"
    return [RecoveryCandidate("restart", plan, from_checkpoint=True, resume_step=resume,
                              lost_steps=ctx.committed_step + 1 - resume, note=note)
            for plan in (fresh_plans(ctx, predict) if fresh is None else fresh)]


def build_candidates(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
                     *, predict_len: PredictLength | None = None, exact_upto: int = 64,
                     memory: MemoryModel | None = None, capacity_bytes: float = math.inf,
                     drop_unfit: bool = True, swap: SwapPricing | None = None,
                     partitioner: Partitioner | None = None, two_phase: bool = False
                     ) -> tuple[list[RecoveryCandidate], dict[str, str]]:
    """Every feasible candidate, and why each infeasible kind was dropped.

    The live leader and the cluster simulator both call this. The fresh plans are built
    once for reparallelize and restart; `predict_len` and `exact_upto` screen pipeline
    counts at cluster scale (see `planner.placement.pipeline_counts`). With `memory`,
    each candidate gets its predicted peak and `fits`, and with `swap` a swap price when
    it fits only by swapping (see `check_memory`). With `partitioner` (the profile's
    layer tables), fresh plans split layers by predicted time within the capacity
    (`balanced_split`; the capacity only when memory-aware), else evenly. With
    `two_phase`, each kept reroute pairs with each kept reparallelize that moves state
    (`two_phase_candidates`)."""
    cands: list[RecoveryCandidate] = []
    dropped: dict[str, str] = {}
    fits = None
    if memory is not None and drop_unfit and capacity_bytes < math.inf:
        def fits(plan: Plan) -> bool:  # with swapping: its floor (no need to price it)
            if swap is None:
                return peak_memory(plan, memory).fits(capacity_bytes)
            return swap_floor(plan, memory) <= capacity_bytes
    split = None
    if partitioner is not None:
        limit = capacity_bytes if memory is not None and drop_unfit else math.inf
        split = balanced_split(partitioner, ctx.old_plan.schedule, limit)
    fresh = fresh_plans(ctx, predict, predict_len=predict_len, exact_upto=exact_upto,
                        fits=fits, split=split)
    builders = {"reroute": lambda: [reroute(ctx)], "redundant": lambda: [redundant(ctx)],
                "reparallelize": lambda: reparallelize(ctx, predict, fresh),
                "restart": lambda: restart(ctx, predict, fresh)}
    for kind, build in builders.items():
        try:
            cands.extend(build())
        except PlanError as e:
            dropped[kind] = str(e)
    if memory is not None:
        cands = check_memory(cands, dropped, memory, capacity_bytes, drop_unfit, swap)
    if two_phase:
        cands.extend(two_phase_candidates(cands, dropped, memory, capacity_bytes, drop_unfit))
    return cands, dropped


def two_phase_candidates(cands: list[RecoveryCandidate], dropped: dict[str, str],
                         memory: MemoryModel | None = None, capacity_bytes: float = math.inf,
                         drop_unfit: bool = True) -> list[RecoveryCandidate]:
    """Reroute now, each reparallelize later: one candidate per reparallelize among
    `cands` that moves state, its transfers copied while the reroute plan trains. While
    they run, each receiving rank holds the copied layers' state beside its stage; with
    `memory` that is added to its phase-one peak, and (with `drop_unfit`) a pair whose
    receivers would not fit is left out, the reason in `dropped["two-phase"]`."""
    first = next((c for c in cands if c.kind == "reroute"), None)
    later = [c for c in cands if c.kind == "reparallelize" and c.transfers]
    if first is None or not later:
        dropped.setdefault("two-phase", "needs a reroute and a reparallelize that moves state")
        return []
    per_rank = plan_memory(first.plan, memory) if memory is not None else {}
    out = []
    for then in later:
        shadow: dict[int, float] = {}
        for t in then.transfers:
            shadow[t.dst] = shadow.get(t.dst, 0.0) + t.nbytes
        c = RecoveryCandidate("two-phase", first.plan, resume_step=first.resume_step,
                              then=then, shadow_bytes=shadow,
                              note=f"reroute now, then {then.note} once "
                                   f"{len(then.transfers)} layer(s) are copied behind")
        c.swap_s, c.swap_budgets = first.swap_s, dict(first.swap_budgets)
        c.floor_bytes = first.floor_bytes
        if per_rank:
            totals = {r: m.total + shadow.get(r, 0.0) for r, m in per_rank.items()}
            c.peak_rank = min(totals, key=lambda r: (-totals[r], r))
            c.peak_bytes = totals[c.peak_rank]
            # a receiver that swaps in phase one would need its budget re-priced: not done
            over = [r for r in shadow if totals.get(r, 0.0) > capacity_bytes
                    or r in first.swap_budgets]
            c.fits = first.fits and not over
            if over and drop_unfit:
                dropped.setdefault("two-phase", f"ranks {sorted(over)} would exceed "
                                   f"{format_size(capacity_bytes)} holding the copied state")
                continue
        out.append(c)
    return out


def check_memory(cands: list[RecoveryCandidate], dropped: dict[str, str],
                 memory: MemoryModel, capacity_bytes: float, drop_unfit: bool = True,
                 swap: SwapPricing | None = None) -> list[RecoveryCandidate]:
    """Fill in each candidate's peak and `fits`; return those kept. With `swap`, one over
    `capacity_bytes` that fits by swapping (`planner.memory.swap_need`) gets its swap
    budgets and price and is kept. With `drop_unfit`, one that fits neither way is
    dropped, its reason in `dropped` under its kind (all of that kind dropped) or "kind
    [pipeline lengths]" (others of the kind fit). When none fits, all are kept and
    `dropped["memory"]` says so: the choice then runs over budget, which the event shows,
    rather than the job stopping on a prediction."""
    peaks: dict[int, tuple[PeakMemory, SwapNeed | None, float]] = {}  # restart shares
    for c in cands:
        pk, need, floor = peaks.get(id(c.plan), (None, None, 0.0))
        if pk is None:
            if swap is None:
                pk = peak_memory(c.plan, memory)
            else:  # one per-rank memory table for the peak, the floor and the price
                steps = RankSteps(c.plan, memory)
                pk = peak_of(steps.memory)
                floor = swap_floor(c.plan, memory, steps)
                if not pk.fits(capacity_bytes):
                    need = swap_need(c.plan, memory, capacity_bytes, swap, steps)
            peaks[id(c.plan)] = (pk, need, floor)
        c.peak_bytes, c.peak_rank, c.fits = pk.max_bytes, pk.rank, pk.fits(capacity_bytes)
        c.floor_bytes = floor
        if need is not None:
            c.swap_s, c.swap_budgets = need.exposed_s, dict(need.budgets)
    unfit = [c for c in cands if not c.fits and not c.swap_budgets]
    if not drop_unfit or not unfit:
        return cands
    cap = format_size(capacity_bytes)
    if len(unfit) == len(cands):
        low = min(cands, key=lambda c: c.peak_bytes)
        dropped["memory"] = (f"no candidate fits in {cap} per rank (least: {low.kind} "
                             f"{format_size(low.peak_bytes)} on rank {low.peak_rank}); "
                             f"all kept, the choice runs over budget")
        return cands
    kept = [c for c in cands if c.fits or c.swap_budgets]
    kinds_kept = {c.kind for c in kept}
    for c in unfit:
        key = c.kind if c.kind not in kinds_kept else (
            f"{c.kind} {[len(p.stages) for p in c.plan.pipelines]}")
        why = ""
        if swap is not None and c.floor_bytes <= capacity_bytes:  # the host is what is short
            why = (f"; swapping would fit it but needs more host memory than "
                   f"{format_size(swap.host_bytes)} per rank")
        elif swap is not None:
            why = f", even with swapping (needs {format_size(c.floor_bytes)})"
        dropped.setdefault(key, f"peak {format_size(c.peak_bytes)} on rank {c.peak_rank} "
                                f"> device memory {cap}" + why)
    return kept


# ---- prediction and choice ------------------------------------------------------------
def score(cands: list[RecoveryCandidate], ctx: RecoveryContext, cfg: RecoveryConfig,
          predict: Callable[[Plan], float]) -> None:
    """Fill in each candidate's predicted transition, step time and horizon score."""
    steps: dict[int, float] = {}  # restart shares reparallelize's plans: predict once

    def step_s(c: RecoveryCandidate) -> float:
        if id(c.plan) not in steps:
            steps[id(c.plan)] = predict(c.plan)
        return steps[id(c.plan)] + c.swap_s

    for c in cands:
        c.predicted_step_s = step_s(c)
        if c.then is not None:
            two_phase(c, cfg, step_s(c.then))
            continue
        if c.from_checkpoint:
            load = sum(ctx.layer_bytes) / cfg.checkpoint_load_Bps
            c.predicted_transition_s = cfg.rebuild_s + load + c.lost_steps * c.predicted_step_s
        else:  # transfers run in conflict-free rounds, each as long as its largest
            moved = rounds_s(c.transfers, lambda t: t.nbytes / cfg.transfer_Bps)
            c.predicted_transition_s = cfg.rebuild_s + moved
        useful = max(0.0, cfg.horizon_s - c.predicted_transition_s)
        c.score = useful / c.predicted_step_s * c.plan.global_batch


SWITCH_STEPS = 1.5
"""Phase-one steps between the copy's end and the switch: the leader sees the copy done
at the next commit (half a step on average), the members learn it from the commit
decision after that (one step), and leave at that boundary, nothing aborted."""


def two_phase(c: RecoveryCandidate, cfg: RecoveryConfig, then_step_s: float) -> None:
    """Score a two-phase candidate (its `predicted_step_s` is phase one's): it trains at
    phase one's speed while the background copy runs (`background_s`, the transfers'
    rounds at the background bandwidth) and `SWITCH_STEPS` steps more, stalls for the
    switch (`switch_s`: nothing moves), then trains at `then_step_s` for the rest."""
    c.predicted_transition_s = cfg.rebuild_s
    c.background_s = rounds_s(c.then.transfers, lambda t: t.nbytes / cfg.background_link_Bps)
    c.then.predicted_step_s = then_step_s
    useful = max(0.0, cfg.horizon_s - c.predicted_transition_s)
    phase1 = c.background_s + SWITCH_STEPS * c.predicted_step_s
    first = min(useful, phase1)
    rest = max(0.0, useful - phase1 - cfg.switch_s)
    c.score = (first / c.predicted_step_s + rest / then_step_s) * c.plan.global_batch


def choose(cands: list[RecoveryCandidate], cfg: RecoveryConfig) -> RecoveryCandidate:
    """The fixed policy's best candidate when it has one, else the best overall."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown recovery policy {cfg.policy!r}; expected one of {POLICIES}")
    if not cands:
        raise PlanError("no feasible recovery candidate")
    pool = [c for c in cands if c.kind == cfg.policy] or cands
    return max(pool, key=lambda c: (c.score, -c.predicted_transition_s))

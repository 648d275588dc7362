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
Upward changes (a replacement worker joins) re-plan through reparallelize.

Fresh plans and state transfers come from `planner.placement`; the live coordinator and
the cluster simulator both call `build_candidates`, `score` and `choose` here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from planner.placement import (
    PredictLength,
    RecoveryContext,
    Transfer,
    fresh_plans,
    transfers,
)
from planner.plan import Pipeline, Plan, PlanError, Stage

KINDS = ("reroute", "redundant", "reparallelize", "restart")
POLICIES = ("adaptive", *KINDS)


@dataclass(frozen=True)
class RecoveryConfig:
    """How a recovery plan is chosen."""

    policy: str = "adaptive"
    """adaptive (best predicted work over the horizon) or a fixed kind: reroute,
    redundant, reparallelize, restart (falls back to adaptive when infeasible)."""
    horizon_s: float = 600.0
    """Expected time until the next membership change (e.g. MTBF / ranks)."""
    transfer_Bps: float = 500e6
    """Bandwidth of one state transfer between two ranks."""
    rebuild_s: float = 0.05
    """Agreement + group rebuild time common to every in-place kind."""
    checkpoint_load_Bps: float = 200e6
    """Read bandwidth when reloading a checkpoint."""


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

    def row(self) -> dict:
        return {"kind": self.kind, "predicted_transition_s": self.predicted_transition_s,
                "predicted_step_s": self.predicted_step_s, "score": self.score,
                "lost_steps": self.lost_steps, "transfers": len(self.transfers),
                "moved_bytes": sum(t.nbytes for t in self.transfers), "note": self.note,
                "pipelines": [len(p.stages) for p in self.plan.pipelines]}

    def to_dict(self) -> dict:
        d = self.row()
        d.update(plan=self.plan.to_dict(), resume_step=self.resume_step,
                 from_checkpoint=self.from_checkpoint,
                 transfers=[asdict(t) for t in self.transfers])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RecoveryCandidate:
        return cls(kind=d["kind"], plan=Plan.from_dict(d["plan"]),
                   transfers=[Transfer(**t) for t in d["transfers"]],
                   from_checkpoint=d["from_checkpoint"], resume_step=d["resume_step"],
                   lost_steps=d["lost_steps"],
                   predicted_transition_s=d["predicted_transition_s"],
                   predicted_step_s=d["predicted_step_s"], score=d["score"], note=d["note"])


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
                     *, predict_len: PredictLength | None = None, exact_upto: int = 64
                     ) -> tuple[list[RecoveryCandidate], dict[str, str]]:
    """Every feasible candidate, and why each infeasible kind was dropped.

    The live leader and the cluster simulator both call this. The fresh plans are built
    once for reparallelize and restart; `predict_len` and `exact_upto` screen pipeline
    counts at cluster scale (see `planner.placement.pipeline_counts`)."""
    cands: list[RecoveryCandidate] = []
    dropped: dict[str, str] = {}
    fresh = fresh_plans(ctx, predict, predict_len=predict_len, exact_upto=exact_upto)
    builders = {"reroute": lambda: [reroute(ctx)], "redundant": lambda: [redundant(ctx)],
                "reparallelize": lambda: reparallelize(ctx, predict, fresh),
                "restart": lambda: restart(ctx, predict, fresh)}
    for kind, build in builders.items():
        try:
            cands.extend(build())
        except PlanError as e:
            dropped[kind] = str(e)
    return cands, dropped


# ---- prediction and choice ------------------------------------------------------------
def score(cands: list[RecoveryCandidate], ctx: RecoveryContext, cfg: RecoveryConfig,
          predict: Callable[[Plan], float]) -> None:
    """Fill in each candidate's predicted transition, step time and horizon score."""
    for c in cands:
        c.predicted_step_s = predict(c.plan)
        if c.from_checkpoint:
            load = sum(ctx.layer_bytes) / cfg.checkpoint_load_Bps
            c.predicted_transition_s = cfg.rebuild_s + load + c.lost_steps * c.predicted_step_s
        else:
            per_dst: dict[int, float] = {}
            per_src: dict[int, float] = {}
            for t in c.transfers:
                per_dst[t.dst] = per_dst.get(t.dst, 0.0) + t.nbytes
                per_src[t.src] = per_src.get(t.src, 0.0) + t.nbytes
            busiest = max([*per_dst.values(), *per_src.values(), 0.0])
            c.predicted_transition_s = cfg.rebuild_s + busiest / cfg.transfer_Bps
        useful = max(0.0, cfg.horizon_s - c.predicted_transition_s)
        c.score = useful / c.predicted_step_s * c.plan.global_batch


def choose(cands: list[RecoveryCandidate], cfg: RecoveryConfig) -> RecoveryCandidate:
    """The fixed policy's best candidate when it has one, else the best overall."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown recovery policy {cfg.policy!r}; expected one of {POLICIES}")
    if not cands:
        raise PlanError("no feasible recovery candidate")
    pool = [c for c in cands if c.kind == cfg.policy] or cands
    return max(pool, key=lambda c: (c.score, -c.predicted_transition_s))

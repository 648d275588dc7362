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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from planner.partition import assign_microbatches, split_microbatches
from planner.plan import Pipeline, Plan, PlanError, Stage, even_partition

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


@dataclass(frozen=True)
class Transfer:
    """Layer state that moves from a surviving replica to its new holder."""

    layer: int
    src: int
    dst: int
    nbytes: float


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


@dataclass
class RecoveryContext:
    """What the leader knows when it plans a recovery."""

    old_plan: Plan
    members: list[int]
    """Ranks of the new generation (survivors and newcomers)."""
    committed_step: int
    """Last step every survivor applied."""
    layer_bytes: list[float]
    """Parameter + optimizer state bytes of each layer."""
    checkpoint_step: int | None = None
    """Latest complete checkpoint, if any."""
    newcomers: list[int] = field(default_factory=list)

    @property
    def dead(self) -> set[int]:
        return set(self.old_plan.ranks) - set(self.members)

    def surviving_holders(self, layer: int) -> list[int]:
        return [r for r in self.old_plan.holders(layer) if r in self.members]


# ---- candidate builders -------------------------------------------------------------
def reroute(ctx: RecoveryContext) -> RecoveryCandidate:
    old, dead = ctx.old_plan, ctx.dead
    if ctx.newcomers:
        raise PlanError("reroute only handles lost ranks, not newcomers")
    load = {r: sum(r in p.ranks for p in old.pipelines) for r in old.ranks}
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
    return RecoveryCandidate("redundant", plan, transfers=_transfers(ctx, plan),
                             resume_step=ctx.committed_step + 1,
                             note="neighbour stages adopt the lost layers")


def fresh_plans(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
                max_options: int = 6) -> list[Plan]:
    """Plans built from scratch for the members: several pipeline counts, each with
    stages assigned to keep layers where they already are."""
    old, members = ctx.old_plan, sorted(ctx.members)
    n = len(members)
    out = []
    for dp in range(1, n + 1):
        lengths = [n // dp + (1 if i < n % dp else 0) for i in range(dp)]
        if max(lengths) > old.num_layers or dp > old.num_microbatches:
            continue
        out.append(_fresh_plan(ctx, lengths, predict))
    if predict is not None and len(out) > max_options:
        out = sorted(out, key=predict)[:max_options]
    return out


def _fresh_plan(ctx: RecoveryContext, lengths: list[int],
                predict: Callable[[Plan], float] | None) -> Plan:
    old = ctx.old_plan
    free = sorted(ctx.members)
    pipelines = []
    for length in lengths:
        sizes = even_partition(old.num_layers, length)
        bounds = [sum(sizes[:i]) for i in range(length + 1)]
        stages = []
        for s in range(length):
            a, b = bounds[s], bounds[s + 1]
            # the rank already holding most of [a, b) takes it: fewer bytes to move
            best = max(free, key=lambda r: (_overlap(old, r, a, b), -r))
            free.remove(best)
            stages.append(Stage(best, a, b))
        pipelines.append(Pipeline(stages, []))
    counts = [old.num_microbatches // len(lengths)] * len(lengths)
    if len(set(lengths)) > 1:
        per = []
        for p in pipelines:
            one = Plan(old.num_layers, 1, old.microbatch_size, [Pipeline(p.stages, [0])],
                       old.schedule)
            per.append(predict(one) if predict else float(max(s.end - s.start
                                                              for s in p.stages)))
        counts = split_microbatches(old.num_microbatches, per)
    else:
        for i in range(old.num_microbatches % len(lengths)):
            counts[i] += 1
    for p, mbs in zip(pipelines, assign_microbatches(counts)):
        p.microbatches = mbs
    return Plan(old.num_layers, old.num_microbatches, old.microbatch_size, pipelines,
                old.schedule).validate()


def _overlap(plan: Plan, rank: int, a: int, b: int) -> int:
    if rank not in plan.ranks:
        return 0
    st = plan.stage(rank)
    return max(0, min(b, st.end) - max(a, st.start))


def _transfers(ctx: RecoveryContext, plan: Plan) -> list[Transfer]:
    """Layers each member must fetch; sources rotate over the surviving replicas."""
    out = []
    use: dict[int, int] = {}
    for r in plan.ranks:
        st = plan.stage(r)
        have = set(ctx.old_plan.stage(r).layers) if r in ctx.old_plan.ranks else set()
        for layer in st.layers:
            if layer in have:
                continue
            holders = ctx.surviving_holders(layer)
            if not holders:
                raise PlanError(f"layer {layer} has no surviving replica")
            src = min(holders, key=lambda h: (use.get(h, 0), h))
            use[src] = use.get(src, 0) + 1
            out.append(Transfer(layer, src, r, ctx.layer_bytes[layer]))
    return out


def reparallelize(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None
                  ) -> list[RecoveryCandidate]:
    out = []
    for plan in fresh_plans(ctx, predict):
        try:
            out.append(RecoveryCandidate("reparallelize", plan, transfers=_transfers(ctx, plan),
                                         resume_step=ctx.committed_step + 1,
                                         note=f"{len(plan.pipelines)} new pipeline(s)"))
        except PlanError:
            continue
    if not out:
        raise PlanError("reparallelize: some layer has no surviving replica")
    return out


def restart(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None
            ) -> list[RecoveryCandidate]:
    step = ctx.checkpoint_step
    resume = 0 if step is None else step + 1
    note = "no checkpoint: from initialisation" if step is None else f"checkpoint of step {step}"
    return [RecoveryCandidate("restart", plan, from_checkpoint=True, resume_step=resume,
                              lost_steps=ctx.committed_step + 1 - resume, note=note)
            for plan in fresh_plans(ctx, predict)]


def build_candidates(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None
                     ) -> tuple[list[RecoveryCandidate], dict[str, str]]:
    """Every feasible candidate, and why each infeasible kind was dropped."""
    cands: list[RecoveryCandidate] = []
    dropped: dict[str, str] = {}
    builders = {"reroute": lambda: [reroute(ctx)], "redundant": lambda: [redundant(ctx)],
                "reparallelize": lambda: reparallelize(ctx, predict),
                "restart": lambda: restart(ctx, predict)}
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

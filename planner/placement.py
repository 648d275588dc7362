"""Where layers go after a membership change: fresh plans and the state transfers they need.

The one builder of fresh plans and the one builder of transfers, used by the live
leader (`planner.recovery.build_candidates`, called by the coordinator) and by the
cluster simulator alike, so both see the same candidates. Both are indexed (O(1) plan
lookups, per-layer caches, heaps), which keeps a decision at a thousand ranks well
under a second:

- `fresh_plans`: one plan per pipeline count; in each, layers are split among a
  pipeline's stages by predicted time within memory (`balanced_split`, the stage
  partitioner the plan search uses; evenly without a profile), and stages go to
  members so the fewest bytes move (`assign_stages`: an optimal assignment, solved on groups of
  interchangeable ranks). Above `exact_upto` members, only the `screen` counts best by
  a cheap per-length estimate are built (`predict_len`, else `screen_with(predict)`).
- `transfers`: each layer a member must fetch comes from the surviving replica used
  least so far (ties: the lowest rank); `transfer_rounds` schedules them in
  conflict-free rounds and `rounds_s` times them.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from planner.assignment import transport
from planner.memory import inflight_microbatches
from planner.partition import Partitioner, assign_microbatches, split_microbatches
from planner.plan import Pipeline, Plan, PlanError, Stage, even_partition

PredictLength = Callable[[int, int, int], float]
"""(pipeline length, microbatches per pipeline, pipeline count) -> estimated step s."""

LayerSplit = Callable[[int, int], list[int]]
"""(pipeline length, microbatches per pipeline) -> layers per stage."""


def even_split(num_layers: int) -> LayerSplit:
    """Layers per stage as even as they go (without a profile)."""
    return lambda length, m: even_partition(num_layers, length)


def balanced_split(part: Partitioner, schedule: str, memory_limit: float = math.inf
                   ) -> LayerSplit:
    """Layers per stage with the least bottleneck stage time whose every stage fits
    `memory_limit` with the activations its schedule keeps in flight (the plan search's
    partitioner); when none fits, the split that needs the least memory (swapping may
    still fit it: memory then decides about the plan). Cached per (length,
    microbatches)."""
    cache: dict[tuple[int, int], list[int]] = {}

    def split(length: int, m: int) -> list[int]:
        key = (length, m)
        if key not in cache:
            inflight = [inflight_microbatches(schedule, length, s, m) for s in range(length)]
            bounds = part.solve(length, inflight, memory_limit)
            if bounds is None and memory_limit < math.inf:  # the split needing least
                bounds = part.solve(length, inflight, part.min_memory(length, inflight))
            cache[key] = (even_partition(part.n, length) if bounds is None
                          else [b - a for a, b in zip(bounds, bounds[1:])])
        return cache[key]
    return split


@dataclass
class RecoveryContext:
    """What the leader knows when it plans a recovery (a snapshot: do not mutate it)."""

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
    held_extra: dict[int, frozenset[int]] = field(default_factory=dict)
    """Layers a member holds beside its stage of the old plan, up to date (a two-phase
    background copy's): none of them needs fetching."""

    def __post_init__(self) -> None:
        self._members = frozenset(self.members)
        self._alive: dict[int, list[int]] = {}

    @property
    def dead(self) -> set[int]:
        return {r for r in self.old_plan.ranks if r not in self._members}

    def surviving_holders(self, layer: int) -> list[int]:
        """Members holding `layer` in the old plan, sorted (computed once per layer)."""
        alive = self._alive.get(layer)
        if alive is None:
            alive = self._alive[layer] = [r for r in self.old_plan.holders(layer)
                                          if r in self._members]
        return alive


@dataclass(frozen=True)
class Transfer:
    """Layer state that moves from a surviving replica to its new holder."""

    layer: int
    src: int
    dst: int
    nbytes: float
    round: int = 0
    """Conflict-free round (`transfer_rounds`): in one round a rank sends at most one
    transfer and receives at most one."""


def _lengths(n: int, dp: int) -> list[int]:
    """Stages per pipeline for n ranks in dp pipelines (the first ones one longer)."""
    return [n // dp + (1 if i < n % dp else 0) for i in range(dp)]


def pipeline_counts(ctx: RecoveryContext, predict_len: PredictLength | None = None,
                    exact_upto: int = 64, screen: int = 6) -> list[int]:
    """Pipeline counts a fresh plan is built for: every feasible one (no pipeline longer
    than the model, no more pipelines than microbatches); above `exact_upto` members,
    with `predict_len`, the `screen` best by that estimate (infinite ones dropped)."""
    old, n = ctx.old_plan, len(ctx.members)
    feasible = [dp for dp in range(1, min(n, old.num_microbatches) + 1)
                if -(-n // dp) <= old.num_layers]  # the longest pipeline fits the model
    if n <= exact_upto or predict_len is None:
        return feasible
    opts = []
    for dp in feasible:
        est = predict_len(n // dp, -(-old.num_microbatches // dp), dp)
        if est < math.inf:
            opts.append((est, dp))
    return [dp for _, dp in sorted(opts)[:screen]]


def screen_with(old: Plan, predict: Callable[[Plan], float],
                fits: Callable[[Plan], bool] | None = None,
                split: LayerSplit | None = None) -> PredictLength:
    """A pipeline-count estimate from a plan predictor, for callers without a cheaper
    one (the live leader): `predict` of min(dp, 2) pipelines of the length, layers split
    by `split` (default: evenly), with the microbatches of one each (two replicas'
    all-reduce stands for dp's), cached; inf when that plan does not pass `fits`."""
    cache: dict[tuple[int, int, int], float] = {}
    split = split or even_split(old.num_layers)

    def estimate(length: int, m: int, dp: int) -> float:
        key = (length, m, min(dp, 2))
        if key not in cache:
            sizes = split(length, m)
            bounds = [sum(sizes[:i]) for i in range(length + 1)]
            pipes = [Pipeline([Stage(i * length + s, bounds[s], bounds[s + 1])
                               for s in range(length)], list(range(i * m, (i + 1) * m)))
                     for i in range(key[2])]
            plan = Plan(old.num_layers, key[2] * m, old.microbatch_size, pipes, old.schedule)
            cache[key] = predict(plan) if fits is None or fits(plan) else math.inf
        return cache[key]
    return estimate


def fresh_plans(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
                max_options: int = 6, *, predict_len: PredictLength | None = None,
                exact_upto: int = 64, screen: int = 6,
                fits: Callable[[Plan], bool] | None = None,
                split: LayerSplit | None = None) -> list[Plan]:
    """Plans built from scratch for the members, one per pipeline count (see
    `pipeline_counts`), layers split by `split` (default: evenly), each keeping layers
    where they already are; with `predict`, the `max_options` fastest. Above
    `exact_upto` members without `predict_len`, the counts are screened by
    `screen_with(predict, fits, split)`."""
    n = len(ctx.members)
    if predict_len is None and predict is not None and n > exact_upto:
        predict_len = screen_with(ctx.old_plan, predict, fits, split)  # else all are built
    out = [fresh_plan(ctx, _lengths(n, dp), predict, split)
           for dp in pipeline_counts(ctx, predict_len, exact_upto, screen)]
    if predict is not None and len(out) > max_options:
        out = sorted(out, key=predict)[:max_options]
    return out


def fresh_plan(ctx: RecoveryContext, lengths: list[int],
               predict: Callable[[Plan], float] | None = None,
               split: LayerSplit | None = None) -> Plan:
    """Pipelines of the given lengths over the members, layers split in each by `split`
    (default: evenly), stages assigned to ranks so the fewest bytes move
    (`assign_stages`); microbatches split evenly, or by `predict`'s per-pipeline time
    when lengths differ (without `predict`: by the longest stage)."""
    old = ctx.old_plan
    m = -(-old.num_microbatches // len(lengths))  # the most a pipeline gets
    split = split or even_split(old.num_layers)
    spans = []
    for length in lengths:
        sizes = split(length, m)
        bounds = [sum(sizes[:i]) for i in range(length + 1)]
        spans.append([(bounds[s], bounds[s + 1]) for s in range(length)])
    ranks = iter(assign_stages(ctx, [span for pipe in spans for span in pipe]))
    pipelines = [Pipeline([Stage(next(ranks), a, b) for a, b in pipe], []) for pipe in spans]
    counts = [old.num_microbatches // len(lengths)] * len(lengths)
    if len(set(lengths)) > 1:
        per = [predict(Plan(old.num_layers, 1, old.microbatch_size,
                            [Pipeline(p.stages, [0])], old.schedule)) if predict
               else float(max(s.end - s.start for s in p.stages)) for p in pipelines]
        counts = split_microbatches(old.num_microbatches, per)
    else:
        for i in range(old.num_microbatches % len(lengths)):
            counts[i] += 1
    for p, mbs in zip(pipelines, assign_microbatches(counts)):
        p.microbatches = mbs
    return Plan(old.num_layers, old.num_microbatches, old.microbatch_size, pipelines,
                old.schedule).validate()


def assign_stages(ctx: RecoveryContext, spans: list[tuple[int, int]]) -> list[int]:
    """The member that runs each stage (layer span [a, b)), distinct, moving the fewest
    bytes in total: a rank must fetch the layers of its stage it did not hold.

    Ranks that held the same span are interchangeable, and so are stages with the same
    span, so this is a transportation problem on (old span x new span), solved exactly
    by `planner.assignment.transport`; its size is the number of distinct spans, not of
    ranks. Within a group, stages take the lowest free ranks in stage order."""
    old = ctx.old_plan
    groups: dict[tuple[int, int], list[int]] = {}  # old span -> its free members, sorted
    for r in sorted(ctx.members):
        st = old.stage(r) if old.has_rank(r) else None
        groups.setdefault((st.start, st.end) if st else (0, 0), []).append(r)
    held = sorted(groups)
    kinds = sorted(set(spans))
    prefix = [0.0]
    for nbytes in ctx.layer_bytes:
        prefix.append(prefix[-1] + nbytes)
    cost = [[prefix[b] - prefix[a] - max(0.0, prefix[min(b, hb)] - prefix[max(a, ha)])
             for a, b in kinds] for ha, hb in held]
    need = Counter(spans)
    flow = transport([len(groups[g]) for g in held], [need[k] for k in kinds], cost)
    kind_of = {k: i for i, k in enumerate(kinds)}
    taken = [0] * len(held)
    out = []
    for span in spans:
        k = kind_of[span]
        g = min((g for g in range(len(held)) if flow[g][k]),
                key=lambda g: (cost[g][k], groups[held[g]][taken[g]]))
        flow[g][k] -= 1
        out.append(groups[held[g]][taken[g]])
        taken[g] += 1
    return out


def transfers(ctx: RecoveryContext, plan: Plan) -> list[Transfer]:
    """Layers each member of `plan` must fetch, in rank then layer order; each comes from
    the surviving holder used least so far (ties: the lowest rank). Raises `PlanError`
    when some needed layer has no surviving replica."""
    out: list[Transfer] = []
    use: dict[int, int] = {}
    heaps: dict[int, list[tuple[int, int]]] = {}  # layer -> (uses, holder), lower bounds
    old = ctx.old_plan
    for r in plan.ranks:
        st = plan.stage(r)
        have = old.stage(r).layers if old.has_rank(r) else range(0)
        extra = ctx.held_extra.get(r, ())
        for layer in st.layers:
            if layer in have or layer in extra:
                continue
            heap = heaps.get(layer)
            if heap is None:
                holders = ctx.surviving_holders(layer)
                if not holders:
                    raise PlanError(f"layer {layer} has no surviving replica")
                heap = heaps[layer] = [(use.get(h, 0), h) for h in holders]
                heapq.heapify(heap)
            while True:  # uses only grow: refresh the top until it is current
                u, h = heap[0]
                if u == use.get(h, 0):
                    break
                heapq.heapreplace(heap, (use.get(h, 0), h))
            use[h] = u + 1
            heapq.heapreplace(heap, (u + 1, h))
            out.append(Transfer(layer, h, r, ctx.layer_bytes[layer]))
    return transfer_rounds(out)


def transfer_rounds(moves: list[Transfer]) -> list[Transfer]:
    """`moves` in the same order, each given a round in which neither its sender sends
    nor its receiver receives anything else: a proper edge colouring of the (sender,
    receiver) multigraph. Greedy first fit, largest transfers first, so big ones share
    rounds (a round lasts as long as its largest); at most 2 x (most transfers at one
    rank) - 1 rounds, where the optimum (bipartite: Koenig) is that most."""
    sending: dict[int, set[int]] = {}
    receiving: dict[int, set[int]] = {}
    rounds = [0] * len(moves)
    for i in sorted(range(len(moves)), key=lambda i: (-moves[i].nbytes, i)):
        t = moves[i]
        busy_s = sending.setdefault(t.src, set())
        busy_r = receiving.setdefault(t.dst, set())
        k = 0
        while k in busy_s or k in busy_r:
            k += 1
        busy_s.add(k)
        busy_r.add(k)
        rounds[i] = k
    return [replace(t, round=k) for t, k in zip(moves, rounds)]


def rounds_s(moves: list[Transfer], seconds: Callable[[Transfer], float]) -> float:
    """Predicted duration of transfers run round by round: the sum over rounds of the
    longest transfer in the round (`seconds` times one transfer)."""
    longest: dict[int, float] = {}
    for t in moves:
        longest[t.round] = max(longest.get(t.round, 0.0), seconds(t))
    return sum(longest.values())

"""Where layers go after a membership change: fresh plans and the state transfers they need.

The one builder of fresh plans and the one builder of transfers, used by the live
leader (`planner.recovery.build_candidates`, called by the coordinator) and by the
cluster simulator alike, so both see the same candidates. Both are indexed (O(1) plan
lookups, per-layer caches, heaps), which keeps a decision at a thousand ranks well
under a second:

- `fresh_plans`: one plan per pipeline count; in each, every stage goes to the free
  member already holding most of its layers (ties: the lowest rank), so little state
  moves. Above `exact_upto` members, only the `screen` counts best by a cheap per-length
  estimate are built.
- `transfers`: each layer a member must fetch comes from the surviving replica used
  least so far (ties: the lowest rank).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from planner.partition import assign_microbatches, split_microbatches
from planner.plan import Pipeline, Plan, PlanError, Stage, even_partition

PredictLength = Callable[[int, int, int], float]
"""(pipeline length, microbatches per pipeline, pipeline count) -> estimated step s."""


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


def fresh_plans(ctx: RecoveryContext, predict: Callable[[Plan], float] | None = None,
                max_options: int = 6, *, predict_len: PredictLength | None = None,
                exact_upto: int = 64, screen: int = 6) -> list[Plan]:
    """Plans built from scratch for the members, one per pipeline count (see
    `pipeline_counts`), each keeping layers where they already are; with `predict`,
    the `max_options` fastest."""
    n = len(ctx.members)
    out = [fresh_plan(ctx, _lengths(n, dp), predict)
           for dp in pipeline_counts(ctx, predict_len, exact_upto, screen)]
    if predict is not None and len(out) > max_options:
        out = sorted(out, key=predict)[:max_options]
    return out


def fresh_plan(ctx: RecoveryContext, lengths: list[int],
               predict: Callable[[Plan], float] | None = None) -> Plan:
    """Pipelines of the given lengths over the members (see the module docstring);
    microbatches split evenly, or by `predict`'s per-pipeline time when lengths differ
    (without `predict`: by the longest stage)."""
    old = ctx.old_plan
    free = set(ctx.members)
    # Ranks grouped by their old layer span: a group's ranks overlap any stage equally,
    # so the best rank for a stage is the lowest free one of the best-overlapping group.
    groups: dict[tuple[int, int], list[int]] = {}
    for r in sorted(free):
        if old.has_rank(r):
            st = old.stage(r)
            groups.setdefault((st.start, st.end), []).append(r)
    covering: list[list[tuple[int, int]]] = [[] for _ in range(old.num_layers)]
    for sa, sb in sorted(groups):
        for layer in range(sa, sb):
            covering[layer].append((sa, sb))
    lowest = sorted(free)  # sorted lists are heaps; taken ranks are dropped lazily
    pipelines = []
    for length in lengths:
        sizes = even_partition(old.num_layers, length)
        bounds = [sum(sizes[:i]) for i in range(length + 1)]
        stages = []
        for s in range(length):
            a, b = bounds[s], bounds[s + 1]
            best, key = None, (0, 0)
            for sa, sb in {sp for layer in range(a, b) for sp in covering[layer]}:
                heap = groups[(sa, sb)]
                while heap and heap[0] not in free:
                    heapq.heappop(heap)
                if heap:
                    k = (min(b, sb) - max(a, sa), -heap[0])
                    if best is None or k > key:
                        best, key = heap[0], k
            if best is None:  # nobody holds any of [a, b): the lowest free rank
                while lowest[0] not in free:
                    heapq.heappop(lowest)
                best = lowest[0]
            free.discard(best)
            stages.append(Stage(best, a, b))
        pipelines.append(Pipeline(stages, []))
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
        for layer in st.layers:
            if layer in have:
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
    return out

"""Recovery candidates at cluster scale (hundreds to a thousand ranks), fast.

`planner.recovery.build_candidates` is written for the live leader of tens of ranks: its
lookups (`Plan.stage`, `Plan.holders`, `rank in members`) scan the plan, and
`fresh_plans` builds one plan per pipeline count with an O(ranks^2) greedy, which is
minutes per decision at 1024 ranks. This module gives the simulator the same candidates
faster, without touching `planner.recovery`:

- `IndexedPlan` / `MemberList`: drop-in views with O(1) lookups, so `recovery.reroute`,
  `recovery.redundant` and `recovery._transfers` run unchanged on them;
- `fresh_plans_fast`: the greedy of `recovery._fresh_plan` (the rank already holding
  most of a stage's layers takes it, ties to the lowest rank), indexed by layer; with
  more than `exact_upto` members only the `screen` pipeline counts best by a cheap
  closed form are built (every count is built below that, exactly as recovery does).

Scoring and choice stay `recovery.score` / `recovery.choose`. `tests/planner/test_cluster_sim.py`
checks that the candidates equal `recovery.build_candidates`'s on small clusters.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

from planner.partition import assign_microbatches, split_microbatches
from planner.plan import Pipeline, Plan, PlanError, Stage, even_partition
from planner.recovery import (
    RecoveryCandidate,
    RecoveryContext,
    Transfer,
    redundant,
    reroute,
)


class IndexedPlan(Plan):
    """A `Plan` with cached rank and layer lookups (do not mutate it after building)."""

    @classmethod
    def of(cls, plan: Plan) -> IndexedPlan:
        out = cls(plan.num_layers, plan.num_microbatches, plan.microbatch_size,
                  plan.pipelines, plan.schedule)
        out._index()
        return out

    def _index(self) -> None:
        self._where: dict[int, tuple[int, int]] = {}
        self._holders: list[list[int]] = [[] for _ in range(self.num_layers)]
        for pi, p in enumerate(self.pipelines):
            for si, s in enumerate(p.stages):
                if s.rank in self._where:
                    continue
                self._where[s.rank] = (pi, si)
                for layer in s.layers:
                    self._holders[layer].append(s.rank)
        self._holders = [sorted(h) for h in self._holders]
        self._ranks = MemberList(sorted(self._where))

    @property
    def ranks(self) -> list[int]:  # type: ignore[override]
        return self._ranks  # a MemberList: `r in plan.ranks` is O(1)

    def stage_of(self, rank: int) -> tuple[int, int]:
        try:
            return self._where[rank]
        except KeyError:
            raise PlanError(f"rank {rank} is not in the plan") from None

    def holders(self, layer: int) -> list[int]:
        return self._holders[layer]

    def has_rank(self, rank: int) -> bool:
        return rank in self._ranks


class MemberList(list):
    """A list of ranks with O(1) `in` (what `RecoveryContext.members` is scanned with)."""

    def __init__(self, ranks):
        super().__init__(ranks)
        self._set = frozenset(self)

    def __contains__(self, r) -> bool:
        return r in self._set


def indexed_context(old_plan: Plan, members: list[int], committed_step: int,
                    layer_bytes: list[float], checkpoint_step: int | None) -> RecoveryContext:
    """A `RecoveryContext` whose plan and member lookups are O(1)."""
    old = old_plan if isinstance(old_plan, IndexedPlan) else IndexedPlan.of(old_plan)
    newcomers = sorted(r for r in members if not old.has_rank(r))
    return IndexedContext(old, MemberList(sorted(members)), committed_step,
                          list(layer_bytes), checkpoint_step, newcomers)


def _screen_counts(ctx: RecoveryContext, predict_len: Callable[[int, int, int], float],
                   screen: int) -> list[int]:
    """Pipeline counts worth building, best first by a cheap per-sample estimate."""
    old, n = ctx.old_plan, len(ctx.members)
    opts = []
    for dp in range(1, min(n, old.num_microbatches) + 1):
        if -(-n // dp) > old.num_layers:  # the longest pipeline has too many stages
            continue
        est = predict_len(n // dp, -(-old.num_microbatches // dp), dp)
        if est < math.inf:
            opts.append((est, dp))
    return [dp for _, dp in sorted(opts)[:screen]]


def fresh_plans_fast(ctx: RecoveryContext, predict: Callable[[Plan], float],
                     predict_len: Callable[[int, int, int], float] | None = None,
                     max_options: int = 6, exact_upto: int = 64, screen: int = 6
                     ) -> list[Plan]:
    """`recovery.fresh_plans` (same plans), indexed; screened above `exact_upto` ranks."""
    old, n = ctx.old_plan, len(ctx.members)
    if n > exact_upto and predict_len is not None:
        counts = _screen_counts(ctx, predict_len, screen)
    else:
        counts = [dp for dp in range(1, n + 1)
                  if max(n // dp + (1 if n % dp else 0), 1) <= old.num_layers
                  and dp <= old.num_microbatches]
    out = []
    for dp in counts:
        lengths = [n // dp + (1 if i < n % dp else 0) for i in range(dp)]
        out.append(_fresh_plan_fast(ctx, lengths, predict))
    if len(out) > max_options:
        out = sorted(out, key=predict)[:max_options]
    return out


def _fresh_plan_fast(ctx: RecoveryContext, lengths: list[int],
                     predict: Callable[[Plan], float]) -> Plan:
    # ranks grouped by their old layer span: all ranks of a group overlap a stage
    # equally, so the greedy's best is the lowest free rank of the best group
    old = ctx.old_plan
    free = set(ctx.members)
    groups: dict[tuple[int, int], list[int]] = {}
    for r in sorted(free):
        if old.has_rank(r):
            st = old.stage(r)
            groups.setdefault((st.start, st.end), []).append(r)
    covering: list[list[tuple[int, int]]] = [[] for _ in range(old.num_layers)]
    for sa, sb in sorted(groups):
        for layer in range(sa, sb):
            covering[layer].append((sa, sb))
    lowest = sorted(free)  # heaps of free ranks, cleaned lazily
    pipelines = []
    for length in lengths:
        sizes = even_partition(old.num_layers, length)
        bounds = [sum(sizes[:i]) for i in range(length + 1)]
        stages = []
        for s in range(length):
            a, b = bounds[s], bounds[s + 1]
            best, key = None, (0, 0)
            spans = {sp for layer in range(a, b) for sp in covering[layer]}
            for sa, sb in spans:
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
                            [Pipeline(p.stages, [0])], old.schedule)) for p in pipelines]
        counts = split_microbatches(old.num_microbatches, per)
    else:
        for i in range(old.num_microbatches % len(lengths)):
            counts[i] += 1
    for p, mbs in zip(pipelines, assign_microbatches(counts)):
        p.microbatches = mbs
    return IndexedPlan.of(Plan(old.num_layers, old.num_microbatches, old.microbatch_size,
                               pipelines, old.schedule).validate())


class IndexedContext(RecoveryContext):
    """`RecoveryContext` with the surviving holders of each layer computed once."""

    def surviving_holders(self, layer: int) -> list[int]:
        cache = self.__dict__.setdefault("_alive", {})
        if layer not in cache:
            cache[layer] = [r for r in self.old_plan.holders(layer) if r in self.members]
        return cache[layer]


def transfers_fast(ctx: RecoveryContext, plan: Plan) -> list[Transfer]:
    """`recovery._transfers` (same transfers, same order): each missing layer comes from
    the surviving holder used least so far (ties: lowest rank), found with one lazy heap
    of (uses, rank) per layer instead of a scan of every holder."""
    out: list[Transfer] = []
    use: dict[int, int] = {}
    heaps: dict[int, list[tuple[int, int]]] = {}
    old = ctx.old_plan
    for r in plan.ranks:
        st = plan.stage(r)
        if old.has_rank(r) if isinstance(old, IndexedPlan) else r in old.ranks:
            os_ = old.stage(r)
            have = range(os_.start, os_.end)
        else:
            have = range(0)
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
            while True:  # entries are lower bounds (uses only grow): fix the top
                u, h = heap[0]
                if u == use.get(h, 0):
                    break
                heapq.heapreplace(heap, (use.get(h, 0), h))
            use[h] = u + 1
            heapq.heapreplace(heap, (u + 1, h))
            out.append(Transfer(layer, h, r, ctx.layer_bytes[layer]))
    return out


def build_candidates_fast(ctx: RecoveryContext, predict: Callable[[Plan], float],
                          predict_len: Callable[[int, int, int], float] | None = None,
                          exact_upto: int = 64) -> tuple[list[RecoveryCandidate], dict]:
    """What `recovery.build_candidates` returns, for an `indexed_context`."""
    cands: list[RecoveryCandidate] = []
    dropped: dict[str, str] = {}
    for kind, build in (("reroute", lambda: [reroute(ctx)]),
                        ("redundant", lambda: [redundant(ctx)])):
        try:
            cands.extend(build())
        except PlanError as e:
            dropped[kind] = str(e)
    fresh = fresh_plans_fast(ctx, predict, predict_len, exact_upto=exact_upto)
    repar = []
    for plan in fresh:
        try:
            repar.append(RecoveryCandidate("reparallelize", plan,
                                           transfers=transfers_fast(ctx, plan),
                                           resume_step=ctx.committed_step + 1,
                                           note=f"{len(plan.pipelines)} new pipeline(s)"))
        except PlanError:
            continue
    if repar:
        cands.extend(repar)
    else:
        dropped["reparallelize"] = "reparallelize: some layer has no surviving replica"
    step = ctx.checkpoint_step
    resume = 0 if step is None else step + 1
    note = "no checkpoint: from initialisation" if step is None else f"checkpoint of step {step}"
    cands.extend(RecoveryCandidate("restart", plan, from_checkpoint=True, resume_step=resume,
                                   lost_steps=ctx.committed_step + 1 - resume, note=note)
                 for plan in fresh)
    return cands, dropped

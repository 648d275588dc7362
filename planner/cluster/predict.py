"""Step times for the cluster simulator: the closed form, cached per plan shape.

`Predictor` is what the simulator and its policies call for a plan's step time: the
closed form (`planner.closed_form.estimate_plan`) by default, raised by
`shared_stage_bound` for rerouted plans, or the event simulator; cached by plan shape;
with per-rank slowdowns for fail-slow nodes and a cheap screen of pipeline counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from planner.closed_form import estimate_plan, pipeline_s
from planner.cost import CostModel
from planner.placement import LayerSplit, balanced_split
from planner.plan import Plan, PlanError
from planner.simulate import simulate_plan


class Predictor:
    """Step time of a plan, cached by its shape (layer ranges, node of each rank,
    microbatch counts), with per-rank slowdowns for fail-slow nodes."""

    def __init__(self, cost: CostModel, how: str, factor: float,
                 memory_limit: float = math.inf):
        if how not in ("closed-form", "event"):
            raise PlanError(f"unknown predictor {how!r}; expected 'closed-form' or 'event'")
        self.cost, self.how, self.factor = cost, how, factor
        self.memory_limit = memory_limit
        self.event_upto = 4096
        """Shared-stage plans with at most this many microbatches x ranks go to the
        event simulator (their fill/drain stalls are large); larger ones use the bound
        of `shared_stage_bound`, which is tight once steady state dominates."""
        self.cache: dict[tuple, float] = {}
        self.calls = 0
        self._slowed: dict[tuple, Predictor] = {}  # see `with_slowdown`
        self._split: LayerSplit | None = None  # see `by_length`

    def key(self, plan: Plan) -> tuple:
        node = self.cost.node_of
        if plan.has_shared_stages or self.cost.slowdown:  # which ranks: key by rank
            return (plan.microbatch_size, plan.schedule, tuple(
                (tuple((s.start, s.end, s.rank) for s in p.stages), len(p.microbatches))
                for p in plan.pipelines))
        # link classes only depend on which ranks share a node: number nodes by first use
        seen: dict[int, int] = {}
        return (plan.microbatch_size, plan.schedule, tuple(
            (tuple((s.start, s.end, seen.setdefault(node(s.rank), len(seen)))
                   for s in p.stages), len(p.microbatches))
            for p in plan.pipelines))

    def __call__(self, plan: Plan) -> float:
        k = self.key(plan)
        if k not in self.cache:
            self.calls += 1
            small = plan.num_microbatches * plan.world_size <= self.event_upto
            if self.how == "event" or (small and plan.has_shared_stages):
                raw = simulate_plan(plan, self.cost).step_time_s
            else:
                est = estimate_plan(plan, self.cost)
                raw = est.step_s + max(shared_stage_bound(plan, self.cost) - est.pipeline_s,
                                       0.0)
            self.cache[k] = raw * self.factor
        return self.cache[k]

    def by_length(self, length: int, m: int, dp: int) -> float:
        """Cheap screen of a pipeline count: one pipeline of `length` stages over m
        microbatches, its layers split as the fresh plan will split them (by time within
        the memory limit, `planner.placement.balanced_split`, as the live leader's screen
        does), plus the ring all-reduce of its largest stage over the dp replicas across
        nodes; inf when a stage's static state does not fit in memory."""
        key = ("len", length, m, dp)
        if key in self.cache:
            return self.cache[key]
        if self._split is None:  # the screen's microbatch of 1, as its times below
            self._split = balanced_split(self.cost.partitioner(1), "1f1b", self.memory_limit)
        sizes = self._split(length, m)
        b = [sum(sizes[:i]) for i in range(length + 1)]
        fwd = [self.cost.forward_s(b[i], b[i + 1], 1) for i in range(length)]
        bwd = [self.cost.backward_s(b[i], b[i + 1], 1) for i in range(length)]
        if max(self.cost.memory.static(b[i], b[i + 1]).total
               for i in range(length)) > self.memory_limit:
            out = math.inf
        else:
            ar = max(self.cost.allreduce_link_s("inter", dp,
                                                self.cost.grad_bytes(b[i], b[i + 1]))
                     for i in range(length))
            out = pipeline_s("1f1b", fwd, bwd, m) + ar
        self.cache[key] = out
        return out

    def with_slowdown(self, slow: Mapping[int, float]) -> Predictor:
        """This predictor with ranks computing slow[r] x slower (the cost model's
        `slowdown`, so every predictor path prices them), one per slow set."""
        slow = {r: f for r, f in slow.items() if f != 1.0}
        if not slow:
            return self
        key = tuple(sorted(slow.items()))
        if key not in self._slowed:
            cost = CostModel(self.cost.profile, self.cost.config, slowdown=slow)
            p = Predictor(cost, self.how, self.factor, self.memory_limit)
            p.event_upto = self.event_upto
            self._slowed[key] = p
        return self._slowed[key]

    def slowed(self, plan: Plan, slow: Mapping[int, float]) -> float:
        """Step time of `plan` when some ranks compute `slow[r]` x slower."""
        return self.with_slowdown({r: f for r, f in slow.items() if plan.has_rank(r)})(plan)


def shared_stage_bound(plan: Plan, cost: CostModel) -> float:
    """Least pipeline time of a plan with shared stages (reroute): a rank serving several
    pipelines computes all their microbatches, after the first forward reached it and
    before the last backward drains through the stages in front of it. The closed form
    times pipelines one by one and misses this. It ignores the stalls of interleaving
    two pipelines' 1F1B on one rank, so it underestimates: by 5-7% at 8-30 microbatches
    per pipeline (tests/planner/test_cluster_sim.py), more with fewer."""
    if not plan.has_shared_stages:
        return 0.0
    mb = plan.microbatch_size
    busy: dict[int, float] = {}
    lead: dict[int, float] = {}
    for p in plan.pipelines:
        front = 0.0
        for a, st in enumerate(p.stages):
            fb = (cost.forward_s(st.start, st.end, mb) + cost.backward_s(st.start, st.end, mb)
                  ) * cost.speed_factor(st.rank)
            busy[st.rank] = busy.get(st.rank, 0.0) + fb * len(p.microbatches)
            lead[st.rank] = max(lead.get(st.rank, 0.0), front)
            if a + 1 < len(p.stages):
                nxt = p.stages[a + 1]
                front += fb + 2 * cost.p2p_s(st.rank, nxt.rank,
                                             cost.boundary_bytes(st.end - 1, mb))
    return max(busy[r] + lead[r] for r in busy)


def layer_state_bytes(cost: CostModel) -> list[float]:
    """Parameter + optimizer state bytes per layer (what migrates or is checkpointed)."""
    out = []
    for i in range(cost.num_layers):
        m = cost.memory.static(i, i + 1)
        out.append(m.params + m.optimizer)
    return out

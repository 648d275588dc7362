"""Reduce a plan to one representative pipeline per class of identical pipelines.

Two pipelines behave identically in the simulator when they have the same layer
partition, the same number of microbatches, the same link class on every hop and the
same slowdown on every stage. The
reduced program keeps one pipeline per class and replaces each all-reduce's members by
the representatives holding that layer range, while the cost of the collective is
taken from the full member list (`overrides`). Every other rank copies its
representative's result.

`simulate_reduced` (behind `planner.simulate.simulate_plan`) lowers the representatives directly
(`planner.lowering.lower_pipelines`) and, when pipelines run long steady states,
extrapolates them from three shorter probe runs after checking exact linearity. Plans
where a rank serves several pipelines are simulated in full, and so is any plan whose
fast simulation raises, so errors name real instructions.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from planner.cost import CostModel
from planner.event_loop import SimResult, SimulationError, State, finish, run_lowered, simulate
from planner.lowering import BARRIER, LOCAL, lower_pipelines
from planner.plan import Pipeline, Plan, Stage
from planner.program import Instruction, Op, Program, compile_plan

STEADY_MARGIN = 4
"""Microbatches beyond the pipeline length kept when a steady state is extrapolated."""
STRIDE = 12
"""Microbatch spacing of the three probe runs of an extrapolation; the extrapolation
distance is a multiple of it, so steady states whose period divides 12 are exact."""
_FIELDS = ("compute_s", "p2p_s", "bubble_s")


@dataclass
class ReducedPlan:
    """A smaller program that simulates to the same result as the full plan."""

    program: Program
    """Program of the representative pipelines."""
    overrides: dict[tuple[int, int, tuple[int, ...]], tuple[int, ...]]
    """(start, end, representative group) -> full all-reduce member list."""
    representative: dict[int, int]
    """Every rank of the full plan -> the rank whose result it shares."""


def layer_groups(plan: Plan) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """Same result as `Plan.layer_groups()` in O(segments x pipelines)."""
    bounds = sorted({b for p in plan.pipelines for st in p.stages for b in (st.start, st.end)})
    starts = [[st.start for st in p.stages] for p in plan.pipelines]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        members = tuple(sorted(p.stages[bisect_right(s, a) - 1].rank
                               for p, s in zip(plan.pipelines, starts)))
        out.append(((a, b), members))
    return out


def _classes(plan: Plan, cost) -> tuple[list[list[int]], dict[int, int]]:
    """Pipeline indices per class, and every rank -> its representative rank."""
    classes: dict[tuple, list[int]] = {}
    for pi, pipe in enumerate(plan.pipelines):
        key = (tuple((st.start, st.end, cost.speed_factor(st.rank)) for st in pipe.stages),
               len(pipe.microbatches),
               tuple(cost.link(a.rank, b.rank) for a, b in zip(pipe.stages, pipe.stages[1:])))
        classes.setdefault(key, []).append(pi)
    representative: dict[int, int] = {}
    for members in classes.values():
        rep = plan.pipelines[members[0]]
        for pi in members:
            for st, rst in zip(plan.pipelines[pi].stages, rep.stages):
                representative[st.rank] = rst.rank
    return list(classes.values()), representative


def reduce_plan(plan: Plan, cost: CostModel, shift: int = 0,
                _cached: tuple | None = None) -> ReducedPlan:
    """One representative pipeline per class; each trains `shift` fewer microbatches."""
    if _cached is None:
        plan.validate()
        classes, representative = _classes(plan, cost)
        groups = sorted((g for g in layer_groups(plan) if len(g[1]) > 1),
                        key=lambda g: -g[0][0])
    else:
        classes, representative, groups = _cached
    reps: list[Pipeline] = []
    next_mb = 0
    for members in classes:
        rep = plan.pipelines[members[0]]
        n = len(rep.microbatches) - shift
        if n < 1:
            raise ValueError(f"shift {shift} leaves a pipeline without microbatches")
        reps.append(Pipeline([Stage(st.rank, st.start, st.end) for st in rep.stages],
                             list(range(next_mb, next_mb + n))))
        next_mb += n
    sub = Plan(plan.num_layers, next_mb, plan.microbatch_size, reps, plan.schedule)
    program = compile_plan(sub)
    overrides: dict = {}
    for pipe in reps:
        for st in pipe.stages:
            instrs = [i for i in program.instructions[st.rank] if i.op is not Op.ALLREDUCE]
            at = next(k for k in range(len(instrs) - 1, -1, -1)
                      if instrs[k].op is Op.COMMIT)
            ars = []
            for (a, b), full in groups:
                if st.start <= a and b <= st.end:
                    rep_group = tuple(sorted({representative[m] for m in full}))
                    overrides[(a, b, rep_group)] = full
                    ars.append(Instruction(Op.ALLREDUCE, start=a, end=b, group=rep_group))
            program.instructions[st.rank] = instrs[:at] + ars + instrs[at:]
    return ReducedPlan(program, overrides, representative)


def _lower_reduced(plan: Plan, cost, shift: int, cached: tuple):
    classes, representative, groups = cached
    pipes, next_mb = [], 0
    for members in classes:
        rep = plan.pipelines[members[0]]
        n = len(rep.microbatches) - shift
        pipes.append((rep, list(range(next_mb, next_mb + n))))
        next_mb += n
    overrides: dict = {}
    return lower_pipelines(plan, pipes, groups, representative, cost, overrides)


def simulate_reduced(plan: Plan, cost: CostModel,
                     steady_margin: int = STEADY_MARGIN) -> SimResult:
    """Simulate `plan` through its reduced program; see the module docstring.

    When every pipeline trains many more microbatches than it has stages, the pipeline
    phase is run at three smaller counts (n - K, n - K + 12, n - K + 24 per pipeline; K
    a multiple of 12), each rank's clock, breakdown and peak memory are checked to grow
    exactly linearly between them (steady state reached) and extrapolated to n; the
    all-reduce, commit and optimizer tail is then simulated from the extrapolated
    clocks. If the check fails the full reduced program is simulated.
    """
    plan.validate()
    stages = [st.rank for p in plan.pipelines for st in p.stages]
    if len(set(stages)) != len(stages):  # a rank serves several pipelines: no symmetry
        return simulate(compile_plan(plan), cost)
    classes, representative = _classes(plan, cost)
    groups = sorted((g for g in layer_groups(plan) if len(g[1]) > 1), key=lambda g: -g[0][0])
    cached = (classes, representative, groups)
    try:
        result = _simulate_classes(plan, cost, cached, steady_margin)
    except SimulationError:  # re-run in full for a message naming real instructions
        return simulate(compile_plan(plan), cost)
    ranks = {r: result.ranks[rep] for r, rep in representative.items()}
    return SimResult(result.step_time_s, ranks, plan)


def _simulate_classes(plan: Plan, cost, cached: tuple, steady_margin: int) -> SimResult:
    classes = cached[0]
    counts = [len(plan.pipelines[c[0]].microbatches) for c in classes]
    longest = max(len(plan.pipelines[c[0]].stages) for c in classes)
    shift = (min(counts) - (longest + steady_margin)) // STRIDE * STRIDE
    result = None
    probe_work = 3 * (min(counts) - shift) + 3 * STRIDE  # microbatches the probes run
    if shift > 2 * STRIDE and probe_work < 0.75 * min(counts):
        result = _extrapolated(plan, cost, shift, cached)
    if result is None:
        lowered, static, chans = _lower_reduced(plan, cost, 0, cached)
        state = State(sorted(lowered))
        run_lowered(lowered, state, cost.config.send_overhead_s, chans)
        result = finish(state, static, plan)
    return result


def _extrapolated(plan: Plan, cost, shift: int, cached: tuple) -> SimResult | None:
    send_overhead = cost.config.send_overhead_s
    probes = []
    for k in (shift, shift - STRIDE, shift - 2 * STRIDE):
        lowered, static, chans = _lower_reduced(plan, cost, k, cached)
        heads, tails = {}, {}
        for r, prog in lowered.items():
            cut = next((i for i, x in enumerate(prog) if x[0] in (BARRIER, LOCAL)), len(prog))
            heads[r], tails[r] = prog[:cut], prog[cut:]
        state = State(sorted(lowered))
        run_lowered(heads, state, send_overhead, chans)
        probes.append((state, tails, static))
    (s1, tails, static), (s2, _, _), (s3, _, _) = probes
    scale = shift / STRIDE
    out = State(sorted(s1.clock))
    for r in s1.clock:
        vals = [(s1.clock[r], s2.clock[r], s3.clock[r]), (s1.peak[r], s2.peak[r], s3.peak[r])]
        vals += [(getattr(s1.bd[r], f), getattr(s2.bd[r], f), getattr(s3.bd[r], f))
                 for f in _FIELDS]
        for a, b, c in vals:
            if abs((c - b) - (b - a)) > 1e-9 * max(abs(c), 1e-3):
                return None
        out.clock[r] = s1.clock[r] + scale * (s2.clock[r] - s1.clock[r])
        out.peak[r] = s1.peak[r] + scale * (s2.peak[r] - s1.peak[r])
        for f in _FIELDS:
            a, b = getattr(s1.bd[r], f), getattr(s2.bd[r], f)
            setattr(out.bd[r], f, a + scale * (b - a))
    run_lowered(tails, out, send_overhead)
    return finish(out, static, plan)

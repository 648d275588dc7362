"""Plan search: DP x PP shapes, stage partitions, microbatch counts and splits.

For every microbatch size (global batch fixed), schedule and data-parallel degree dp,
the N ranks form dp pipelines of floor(N/dp) or ceil(N/dp) stages (unequal pipelines
when dp does not divide N). Each pipeline length gets a stage partition by exact
min-max search under the memory limit (`Partitioner`), microbatches are split across
pipelines in proportion to their speed, and the shape is scored with the closed form.
The best `top_k` become `Plan`s and are ranked by the event simulator.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass, field, replace

import numpy as np

from planner.closed_form import finish_offsets, pipeline_terms
from planner.cost import CostConfig, CostModel
from planner.memory import inflight_microbatches
from planner.partition import Partitioner, assign_microbatches, makespan, split_microbatches
from planner.plan import Pipeline, Plan, PlanError, Stage
from planner.simulate import SimResult, simulate_plan
from profiler.profile import Profile
from profiler.units import GiB, format_size


@dataclass(frozen=True)
class SearchConfig:
    """The world, the batch and the limits a plan must respect."""

    num_nodes: int = 1
    """Nodes in the world."""
    ranks_per_node: int = 8
    """Ranks (devices) per node; world size = num_nodes * ranks_per_node."""
    memory_limit_bytes: float = 80 * GiB
    """Memory available to each rank."""
    global_batch: int | None = None
    """Samples per step; each microbatch size dividing it is tried."""
    microbatch_sizes: tuple[int, ...] = (1,)
    """Microbatch sizes to try."""
    num_microbatches: int | None = None
    """Fix the microbatch count instead (global batch = count x each size)."""
    schedules: tuple[str, ...] = ("1f1b",)
    """Pipeline schedules to try ('1f1b', 'gpipe')."""
    placements: tuple[str, ...] = ("pipeline-major", "stage-major")
    """Rank layouts: consecutive ranks form a pipeline, or hold the same stage (tried
    only for equal pipelines on more than one node)."""
    unequal_pipelines: bool = True
    """Allow pipelines of two lengths when dp does not divide the world (1F1B only)."""
    max_stages: int | None = None
    """Cap on pipeline length (default: the number of layers)."""
    top_k: int = 8
    """Shapes, best by closed form, that are simulated."""
    max_results: int = 5
    """Plans returned."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node

    def batch_options(self) -> list[tuple[int, int]]:
        """(num_microbatches, microbatch_size) pairs to try."""
        if self.num_microbatches is not None:
            return [(self.num_microbatches, mb) for mb in self.microbatch_sizes]
        if self.global_batch is None:
            raise PlanError("give global_batch (with microbatch_sizes) or num_microbatches")
        opts = [(self.global_batch // mb, mb) for mb in self.microbatch_sizes
                if mb > 0 and self.global_batch % mb == 0]
        if not opts:
            raise PlanError(f"no microbatch size in {self.microbatch_sizes} divides the "
                            f"global batch {self.global_batch}")
        return opts


class NoPlanFitsError(PlanError):
    """No plan fits the memory limit; `min_memory_bytes` is the least that would."""

    def __init__(self, limit: float, min_memory: float, shape: str):
        self.limit = limit
        self.min_memory_bytes = min_memory
        self.shape = shape
        super().__init__(
            f"no plan fits in {format_size(limit)} per rank: the smallest per-rank memory "
            f"any plan needs is {format_size(min_memory)} ({min_memory:.0f} bytes, {shape})")


@dataclass
class Shape:
    """A screened candidate: how the ranks and layers are arranged."""

    schedule: str
    microbatch_size: int
    num_microbatches: int
    dp: int
    classes: list[tuple[int, int]]
    """(stages, how many pipelines), longer pipelines first."""
    bounds: dict[int, list[int]]
    """Pipeline length -> stage boundaries."""
    terms: list[tuple[float, float, int]]
    """Per class (fixed_s, per_microbatch_s, pipelines) of the closed form."""
    placement: str
    estimate_s: float

    def describe(self) -> str:
        pp = " + ".join(f"{n}x{p}" for p, n in self.classes)
        shape = (f"dp={self.dp} x pp={self.classes[0][0]}" if len(self.classes) == 1
                 else f"dp={self.dp} ({pp} stages)")
        return (f"{shape}, {self.schedule}, {self.num_microbatches} x mb "
                f"{self.microbatch_size}, {self.placement}")


@dataclass
class PlanChoice:
    """A plan with its predictions."""

    plan: Plan
    step_time_s: float
    """Simulated step time."""
    estimate_s: float
    """Closed-form estimate used for pruning."""
    sim: SimResult
    """Full simulation result (per-rank breakdown and memory)."""
    shape: str
    """Human description of the shape."""

    @property
    def samples_per_s(self) -> float:
        return self.plan.global_batch / self.step_time_s

    @property
    def max_memory_bytes(self) -> float:
        return self.sim.max_memory


@dataclass
class SearchResult:
    """Ranked plans and how much work the search did."""

    choices: list[PlanChoice]
    considered: int
    """Shapes looked at (fitting or not)."""
    feasible: int
    """Of which fit in memory."""
    simulated: int
    """Simulated."""
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> PlanChoice:
        return self.choices[0]

    def table(self) -> str:
        head = (f"{'#':>2}  {'step ms':>10}  {'closed ms':>10}  {'samples/s':>10}  "
                f"{'max mem':>11}  {'compute':>8} {'bubble':>8} {'p2p':>7} {'allred':>7} "
                f"{'opt':>6}  shape")
        lines = [head]
        for i, c in enumerate(self.choices):
            b = c.sim.mean_breakdown()
            lines.append(
                f"{i:>2}  {c.step_time_s * 1e3:>10.2f}  {c.estimate_s * 1e3:>10.2f}  "
                f"{c.samples_per_s:>10.2f}  {format_size(c.max_memory_bytes):>11}  "
                f"{b['compute_s'] * 1e3:>8.1f} {b['bubble_s'] * 1e3:>8.1f} "
                f"{b['p2p_s'] * 1e3:>7.1f} {b['allreduce_s'] * 1e3:>7.1f} "
                f"{b['optimizer_s'] * 1e3:>6.1f}  {c.shape}")
        return "\n".join(lines)


def search(model: Profile | CostModel, config: SearchConfig) -> SearchResult:
    """Best plans for the world and batch of `config`; see the module docstring.

    Raises `NoPlanFitsError` (naming the smallest memory that would work) when no
    shape fits `memory_limit_bytes`.
    """
    t0 = time.perf_counter()
    cost = _cost_for(model, config)
    shapes, infeasible, considered = _screen(cost, config)
    if not shapes:
        if not infeasible:
            raise PlanError(
                f"no shape exists: {config.world_size} ranks need at least "
                f"{-(-config.world_size // cost.num_layers)} pipelines of <= "
                f"{cost.num_layers} stages and each pipeline a microbatch "
                f"(batch options {config.batch_options()})")
        need, desc = min(infeasible, key=lambda x: x[0])
        raise NoPlanFitsError(config.memory_limit_bytes, need, desc)
    shapes.sort(key=lambda s: s.estimate_s / (s.num_microbatches * s.microbatch_size))
    choices, notes = [], []
    for shape in shapes[: max(1, config.top_k)]:
        plan = build_plan(shape, cost)
        sim = simulate_plan(plan, cost)
        if sim.max_memory > config.memory_limit_bytes * (1 + 1e-9):
            notes.append(f"{shape.describe()}: simulated peak {format_size(sim.max_memory)} "
                         "exceeds the limit; dropped")
            continue
        choices.append(PlanChoice(plan, sim.step_time_s, shape.estimate_s, sim,
                                  shape.describe()))
    choices.sort(key=lambda c: (c.step_time_s / c.plan.global_batch, c.max_memory_bytes))
    return SearchResult(choices[: config.max_results], considered, len(shapes),
                        min(len(shapes), max(1, config.top_k)),
                        time.perf_counter() - t0, notes)


def _cost_for(model: Profile | CostModel, config: SearchConfig) -> CostModel:
    rpn = config.ranks_per_node if config.num_nodes > 1 else None
    if isinstance(model, CostModel):
        if model.config.ranks_per_node == rpn:
            return model
        cost = CostModel(model.profile, replace(model.config, ranks_per_node=rpn))
        cost.calibration = model.calibration
        return cost
    return CostModel(model, CostConfig(ranks_per_node=rpn))


def _layout(shape_classes: list[tuple[int, int]], dp: int, placement: str) -> list[np.ndarray]:
    """Rank arrays [pipelines, stages] per class."""
    if placement == "stage-major":
        p = shape_classes[0][0]
        return [np.arange(p)[None, :] * dp + np.arange(dp)[:, None]]
    out, offset = [], 0
    for p, n in shape_classes:
        out.append(offset + np.arange(n)[:, None] * p + np.arange(p)[None, :])
        offset += n * p
    return out


def _links(cost: CostModel, classes, dp: int, placement: str):
    """Per class: (link of each hop, link of each stage's all-reduce group)."""
    rpn = cost.config.ranks_per_node
    if not rpn:
        return [(["intra"] * (p - 1), ["intra"] * p) for p, _ in classes]
    out = []
    for arr in _layout(classes, dp, placement):
        nodes = arr // rpn
        hop = (nodes[:, 1:] != nodes[:, :-1]).any(axis=0)
        if len(classes) == 1:
            grp = nodes.min(axis=0) != nodes.max(axis=0)
        else:  # groups mix pipeline lengths: assume they span nodes
            grp = np.ones(arr.shape[1], dtype=bool)
        out.append(([("inter" if h else "intra") for h in hop],
                    [("inter" if g else "intra") for g in grp]))
    return out


def _screen(cost: CostModel, cfg: SearchConfig):
    n_ranks, n_layers = cfg.world_size, cost.num_layers
    cap = min(n_layers, cfg.max_stages or n_layers)
    limit = cfg.memory_limit_bytes
    static = cost.memory.static_layer_bytes()
    reserve = cost.memory.config.reserve_bytes
    commit = cost.commit_s()
    shapes: list[Shape] = []
    infeasible: list[tuple[float, str]] = []
    for m, mb in cfg.batch_options():
        fwd, bwd = cost.layer_times(mb)
        saved, out = cost.memory.activation_tables(mb)
        part = Partitioner([f + b for f, b in zip(fwd, bwd)], static, saved, out, reserve)
        pf, pb = np.concatenate([[0.0], np.cumsum(fwd)]), np.concatenate([[0.0], np.cumsum(bwd)])
        solved: dict[tuple, list[int] | None] = {}
        min_mem: dict[tuple, float] = {}
        for schedule in cfg.schedules:
            for dp in range(1, min(n_ranks, m) + 1):
                base, r = divmod(n_ranks, dp)
                if base + (1 if r else 0) > cap:
                    continue
                if r and (not cfg.unequal_pipelines or schedule != "1f1b"):
                    continue
                classes = [(p, n) for p, n in ((base + 1, r), (base, dp - r)) if n > 0]
                m_hi = -(-m // dp) if not r else m - dp + 1
                keys = [(p, tuple(inflight_microbatches(schedule, p, s, m_hi)
                                  for s in range(p))) for p, _ in classes]
                bounds = {}
                for key in keys:
                    if key not in solved:
                        solved[key] = part.solve(key[0], key[1], limit)
                    bounds[key[0]] = solved[key]
                if any(b is None for b in bounds.values()):
                    for key in keys:
                        if key not in min_mem:
                            min_mem[key] = part.min_memory(*key)
                    probe = Shape(schedule, mb, m, dp, classes, {}, [], "pipeline-major", 0)
                    infeasible.append((max(min_mem[k] for k in keys), probe.describe()))
                    continue
                for placement in cfg.placements:
                    if placement == "stage-major" and (r or cfg.num_nodes == 1 or dp == 1
                                                       or base == 1):
                        continue  # unequal pipelines, or the same layout as pipeline-major
                    shapes.append(_score(cost, schedule, mb, m, dp, classes, bounds,
                                         placement, pf, pb, out, commit))
    return shapes, infeasible, len(shapes) + len(infeasible)


def _score(cost, schedule, mb, m, dp, classes, bounds, placement, pf, pb, out, commit):
    terms, opt, offsets = [], 0.0, []
    links = _links(cost, classes, dp, placement)
    for (p, n), (hop_links, _) in zip(classes, links):
        bd = bounds[p]
        f = [float(pf[b] - pf[a]) for a, b in zip(bd, bd[1:])]
        b_ = [float(pb[b] - pb[a]) for a, b in zip(bd, bd[1:])]
        hops = [cost.p2p_link_s(link, out[bd[s + 1] - 1]) for s, link in enumerate(hop_links)]
        terms.append(pipeline_terms(schedule, f, b_, hops) + (n,))
        offsets.append(finish_offsets(b_, hops))
        opt = max(opt, max(cost.optimizer_s(a, e) for a, e in zip(bd, bd[1:])))
    pipe = makespan(m, terms)
    ar = 0.0
    if dp > 1:
        ar = _allreduce_phase(cost, [bounds[p] for p, _ in classes], dp, links, offsets, pipe)
    est = pipe + ar + commit + opt
    return Shape(schedule, mb, m, dp, classes, bounds, terms, placement, est)


def _allreduce_phase(cost, partitions: list[list[int]], dp: int, links, offsets,
                     pipe: float) -> float:
    """All-reduce time exposed after the pipelines end. Stage s is free `offsets[s]`
    before the end; groups are the segments between any two stage boundaries of any
    partition, run latest layers first, each when all its members are free."""
    ready = [[pipe - off for off in offs] for offs in offsets]
    if len(partitions) == 1:  # one group per stage, independent
        bd, grp = partitions[0], links[0][1]
        return max(0.0, max(ready[0][s] + cost.allreduce_link_s(grp[s], dp,
                                                                 cost.grad_bytes(a, b))
                            for s, (a, b) in enumerate(zip(bd, bd[1:]))) - pipe)
    cuts = sorted({b for bd in partitions for b in bd})
    link = "inter" if any("inter" in g for _, g in links) else "intra"
    for a, b in sorted(zip(cuts, cuts[1:]), reverse=True):
        idx = [bisect_right(bd, a) - 1 for bd in partitions]
        start = max(ready[c][i] for c, i in enumerate(idx))
        end = start + cost.allreduce_link_s(link, dp, cost.grad_bytes(a, b))
        for c, i in enumerate(idx):
            ready[c][i] = end
    return max(0.0, max(max(r) for r in ready) - pipe)


def build_plan(shape: Shape, cost: CostModel) -> Plan:
    """The `Plan` of a screened shape (ranks by placement, microbatches by speed)."""
    pipes_ranks: list[list[int]] = []
    per, fixed, lens = [], [], []
    for arr, (p, _), (f, t, _) in zip(_layout(shape.classes, shape.dp, shape.placement),
                                      shape.classes, shape.terms):
        for row in arr.tolist():
            pipes_ranks.append(row)
            per.append(t)
            fixed.append(f)
            lens.append(p)
    m, dp = shape.num_microbatches, shape.dp
    if len(shape.classes) == 1:
        counts = [m // dp + (1 if i < m % dp else 0) for i in range(dp)]
    else:
        counts = split_microbatches(m, per, fixed)
    ids = assign_microbatches(counts)
    pipelines = []
    for ranks, p, mbs in zip(pipes_ranks, lens, ids):
        bd = shape.bounds[p]
        pipelines.append(Pipeline([Stage(r, bd[s], bd[s + 1]) for s, r in enumerate(ranks)],
                                  mbs))
    return Plan(cost.num_layers, m, shape.microbatch_size, pipelines,
                shape.schedule).validate()

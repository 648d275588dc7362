"""Memory model: what a rank holds for a stage under a schedule.

static = parameters + gradients + optimizer state (AdamW: two fp32 moments; a mixed
precision job with fp32 master weights sets `optimizer_bytes_per_param` to 12), per
layer; activations = (bytes saved for backward by the stage's layers + the stage's
output buffer, none on the last stage) x microbatches in flight. 1F1B keeps at most
p - s microbatches alive on stage s of p; GPipe keeps all m. Communication buffers: the
flat gradient copy a replicated stage all-reduces, and one receive buffer each way
(input activation, output gradient).

`plan_memory` gives every rank's peak for any `Plan`, rerouted ones included: a rank
serving several pipelines' microbatches (a shared stage) holds its layers once but the
activations in flight and the receive buffers of each pipeline it serves (an upper
bound: the interleaved schedules rarely peak together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.plan import Plan
from planner.program import Instruction, Op, stage_compute_order
from planner.swap_pricing import RankSwap, floor_bytes, price, rank_step
from profiler.profile import Profile
from profiler.step_profile import StepProfile


@dataclass(frozen=True)
class MemoryConfig:
    """Memory accounting knobs beyond what the profile says."""

    reserve_bytes: float = 0.0
    """Fixed per-rank overhead (framework, allocator fragmentation, comm buffers)."""
    optimizer_bytes_per_param: float | None = None
    """Optimizer state bytes per parameter element; None uses the profile's value."""
    grad_bytes_per_param: float | None = None
    """Gradient bytes per parameter element; None uses the profile's value."""


@dataclass(frozen=True)
class RankMemory:
    """Peak memory of one rank, by category (bytes)."""

    params: float
    """Parameters of the layers held."""
    grads: float
    """Gradients of those parameters."""
    optimizer: float
    """Optimizer state."""
    activations: float
    """Activations alive at the peak (saved tensors + stage output buffers)."""
    reserve: float = 0.0
    """Fixed overhead from `MemoryConfig.reserve_bytes`."""
    comm: float = 0.0
    """Communication buffers (flat all-reduce copy of the gradients, receive buffers)."""

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def static(self) -> float:
        """Everything but the activations (what swapping cannot reduce)."""
        return self.params + self.grads + self.optimizer + self.reserve + self.comm


def inflight_microbatches(schedule: str, num_stages: int, stage: int, m: int) -> int:
    """Most microbatches whose activations stage `stage` holds at once."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(num_stages - stage, m)
    raise ValueError(f"unknown schedule {schedule!r}")


class MemoryModel:
    """Per-layer memory tables from a profile, with O(1) range sums."""

    def __init__(self, profile: Profile, config: MemoryConfig | None = None):
        self.profile = profile
        self.config = config or MemoryConfig()
        c = self.config
        self.grad_bpp = (profile.grad_bytes_per_param if c.grad_bytes_per_param is None
                         else c.grad_bytes_per_param)
        self.opt_bpp = (profile.optimizer_bytes_per_param
                        if c.optimizer_bytes_per_param is None else c.optimizer_bytes_per_param)
        self._params = _prefix([lp.param_bytes for lp in profile.layers])
        self._count = _prefix([lp.param_count for lp in profile.layers])
        self._act: dict[int, tuple[list[float], list[float]]] = {}
        self.swap_cache: dict[tuple, object] = {}
        """Chameleon steps, floors and prices by step shape (`RankSteps`), shared by every
        plan priced with this model: shapes recur across candidates and recoveries."""

    def static_layer_bytes(self) -> list[float]:
        """Parameters + gradients + optimizer state per layer."""
        return [lp.param_bytes + lp.param_count * (self.grad_bpp + self.opt_bpp)
                for lp in self.profile.layers]

    def activation_tables(self, mb: int) -> tuple[list[float], list[float]]:
        """(saved bytes per layer, output bytes per layer) per microbatch of size mb.

        The output column is what a stage ending after that layer holds as its output
        buffer (and sends across the cut). The model's last layer has no cut after it:
        its output feeds the loss, which keeps only what it saves for backward (counted
        in that layer's saved bytes when profiled with the loss) and a scalar, so its
        entry is 0 (counting the logits there overstated a last stage's activations by
        one output per microbatch in flight; seen in benchmarks/model_accuracy.py).
        """
        if mb not in self._act:
            out = self.profile.column("output_bytes", mb)
            if out:
                out[-1] = 0.0
            self._act[mb] = (self.profile.column("activation_bytes", mb), out)
        return self._act[mb]

    def static(self, start: int, end: int) -> RankMemory:
        """Memory of layers [start, end) with no activations alive."""
        params = self._params[end] - self._params[start]
        count = self._count[end] - self._count[start]
        return RankMemory(params, count * self.grad_bpp, count * self.opt_bpp, 0.0,
                          self.config.reserve_bytes)

    def microbatch_bytes(self, start: int, end: int, mb: int) -> float:
        """Activation bytes one in-flight microbatch pins on a stage holding [start, end)."""
        return self.saved_bytes(start, end, mb) + self.activation_tables(mb)[1][end - 1]

    def saved_bytes(self, start: int, end: int, mb: int) -> float:
        """Of those, what autograd saves for backward (what swapping can move; the output
        buffer stays for the send)."""
        return sum(self.activation_tables(mb)[0][start:end])

    def stage(self, start: int, end: int, mb: int, inflight: int) -> RankMemory:
        """Peak memory of a stage holding [start, end) with `inflight` microbatches alive."""
        st = self.static(start, end)
        act = inflight * self.microbatch_bytes(start, end, mb)
        return RankMemory(st.params, st.grads, st.optimizer, act, st.reserve)

    def recv_bytes(self, start: int, end: int, mb: int, last: bool) -> float:
        """Receive buffers of one pipeline's stage [start, end): its input activation
        (not the first stage) and its output's gradient (not the last stage)."""
        out = self.activation_tables(mb)[1]
        return (out[start - 1] if start > 0 else 0.0) + (0.0 if last else out[end - 1])

    def allreduce_bytes(self, start: int, end: int) -> float:
        """The flat gradient copy a replicated stage [start, end) all-reduces."""
        return (self._count[end] - self._count[start]) * self.grad_bpp


def plan_memory(plan: Plan, model: MemoryModel) -> dict[int, RankMemory]:
    """Peak memory of every rank of a `Plan` by the schedule formula (see the module
    docstring: a shared stage adds each served pipeline's activations and buffers)."""
    mb = plan.microbatch_size
    act: dict[int, float] = {}
    recv: dict[int, float] = {}
    span: dict[int, tuple[int, int]] = {}
    for pipe in plan.pipelines:
        p, m = len(pipe.stages), len(pipe.microbatches)
        for s, st in enumerate(pipe.stages):
            k = inflight_microbatches(plan.schedule, p, s, m)
            r = st.rank
            act[r] = act.get(r, 0.0) + k * model.microbatch_bytes(st.start, st.end, mb)
            recv[r] = recv.get(r, 0.0) + model.recv_bytes(st.start, st.end, mb, s == p - 1)
            span[r] = (st.start, st.end)
    out: dict[int, RankMemory] = {}
    for r, (a, b) in span.items():
        st = model.static(a, b)
        flat = model.allreduce_bytes(a, b) if len(plan.holders(a)) > 1 else 0.0
        out[r] = RankMemory(st.params, st.grads, st.optimizer, act[r], st.reserve,
                            comm=recv[r] + flat)
    return out


@dataclass(frozen=True)
class PeakMemory:
    """The per-rank peak of a plan in one line: what a recovery candidate reports."""

    max_bytes: float
    """Largest per-rank peak."""
    rank: int
    """A rank with that peak (the lowest)."""
    static_bytes: float
    """That rank's memory besides activations (what swapping cannot reduce)."""
    mean_bytes: float
    """Mean per-rank peak."""

    def fits(self, capacity_bytes: float) -> bool:
        return self.max_bytes <= capacity_bytes


def peak_memory(plan: Plan, model: MemoryModel) -> PeakMemory:
    """`plan_memory` summed per rank and reduced to its maximum (JSON stays small at a
    thousand ranks)."""
    return peak_of(plan_memory(plan, model))


def peak_of(mem: dict[int, RankMemory]) -> PeakMemory:
    """`peak_memory` of per-rank memory already computed (`plan_memory`)."""
    rank = min(mem, key=lambda r: (-mem[r].total, r))
    top = mem[rank]
    return PeakMemory(top.total, rank, top.static,
                      sum(m.total for m in mem.values()) / max(len(mem), 1))


@dataclass(frozen=True)
class SwapPricing:
    """How swapping activations to host memory is priced for a plan over budget."""

    host_Bps: float = 12e9
    """Device<->host copy bandwidth of one rank (PCIe 4 x16: ~25 GB/s peak, ~12 GB/s
    sustained per direction); the live leader measures it (Chameleon's calibration)."""
    overlap: float = 1.0
    """Fraction of the copy time Chameleon's timeline hides under compute that really
    hides (copy lanes run beside compute; below 1 for copies that slow compute down,
    0: every copy second is exposed)."""
    host_bytes: float = math.inf
    """Host memory one rank's swapped activations may fill: a rank that would hold more
    there at its peak (its saved bytes at the peak less its budget) cannot swap to fit."""


@dataclass(frozen=True)
class SwapNeed:
    """What swapping costs a plan per step, and where."""

    budgets: dict[int, float]
    """Saved-activation bytes each swapping rank may keep resident (capacity - static -
    its output buffers in flight): the budget Chameleon is given on that rank."""
    copied_bytes: dict[int, float]
    """Bytes each swapping rank copies per step (out and back)."""
    exposed_s: float
    """Step time added: the largest per-rank stall Chameleon's timeline predicts (plus
    what `SwapPricing.overlap` < 1 exposes of its hidden copy time)."""


def swap_need(plan: Plan, model: MemoryModel, capacity_bytes: float,
              pricing: SwapPricing, steps: RankSteps | None = None) -> SwapNeed | None:
    """The swap that fits `plan` under `capacity_bytes`, or None when even swapping every
    saved activation Chameleon can cannot (`swap_floor` over the capacity) or a rank's
    swapped bytes would not fit in host memory (`SwapPricing.host_bytes`).

    Only what autograd saves can move (the stage output buffers stay for their sends), so
    a rank over budget keeps `budget = capacity - static - outputs in flight` saved bytes
    resident; Chameleon's own policy and timeline over that rank's step
    (`planner.swap_pricing`) say what it copies and how long the rank stalls. The step
    grows by the largest stall (a stalled rank stalls its pipeline, and the all-reduce
    waits for it). `steps`: the plan's `RankSteps`, when the caller has them."""
    steps = steps or RankSteps(plan, model)
    mem = steps.memory
    over = [r for r, m in mem.items() if m.total > capacity_bytes]
    if not over:
        return SwapNeed({}, {}, 0.0)
    budgets, copied, exposed = {}, {}, 0.0
    for r in over:
        m = mem[r]
        budget = capacity_bytes - m.static - (m.activations - steps.saved_peak(r))
        if budget < steps.floor(r) or steps.saved_peak(r) - budget > pricing.host_bytes:
            return None
        priced = steps.price(r, budget, pricing.host_Bps)
        budgets[r], copied[r] = budget, priced.copied_bytes
        exposed = max(exposed, priced.exposed_s(pricing.overlap))
    return SwapNeed(budgets, copied, exposed)


def swap_floor(plan: Plan, model: MemoryModel, steps: RankSteps | None = None) -> float:
    """The least per-rank capacity `plan` fits in with swapping, on the fullest rank:
    static memory, output buffers in flight and Chameleon's minimum budget for the
    rank's step (`RankSteps.floor`: it swaps within a microbatch, layer by layer)."""
    steps = steps or RankSteps(plan, model)
    mem = steps.memory
    return max((min(m.total, m.static + m.activations - steps.saved_peak(r) + steps.floor(r))
                for r, m in mem.items()), default=0.0)  # a rank that fits needs no swapping


class RankSteps:
    """Each rank's step of one plan as Chameleon's timeline sees it
    (`planner.swap_pricing.rank_step`), built lazily, once per distinct step shape.

    A rank serving one pipeline runs its stage's schedule. A rank serving several (a
    rerouted shared stage) is given its pipelines' stage schedules interleaved op by op:
    close to the list-scheduled order the runtime follows, without simulating the whole
    plan for every candidate (`planner.schedule.list_schedule` is the costly part of a
    reroute candidate at scale)."""

    def __init__(self, plan: Plan, model: MemoryModel):
        mb = plan.microbatch_size
        self.plan, self.model = plan, model
        self.saved = model.activation_tables(mb)[0]
        self.fwd = model.profile.column("forward_s", mb)
        self.bwd = model.profile.column("backward_s", mb)
        self._cache = model.swap_cache
        self.memory = plan_memory(plan, model)
        """Every rank's peak by the schedule formula (`plan_memory`)."""
        self._where: dict[int, list[tuple[int, int]]] = {}  # rank -> [(pipeline, stage)]
        self._inflight: dict[int, float] = {}
        for pi, pipe in enumerate(plan.pipelines):
            p, n = len(pipe.stages), len(pipe.microbatches)
            for s, st in enumerate(pipe.stages):
                r = st.rank
                k = inflight_microbatches(plan.schedule, p, s, n)
                self._where.setdefault(r, []).append((pi, s))
                self._inflight[r] = self._inflight.get(r, 0.0) + k * model.saved_bytes(
                    st.start, st.end, mb)

    def saved_peak(self, rank: int) -> float:
        """Saved bytes alive at the rank's peak by the schedule formula."""
        return self._inflight.get(rank, 0.0)

    def step(self, rank: int) -> tuple[tuple, StepProfile]:
        """(shape key, the rank's step)."""
        plan = self.plan
        parts = []
        for pi, s in self._where.get(rank, []):
            pipe = plan.pipelines[pi]
            st = pipe.stages[s]
            parts.append((s, len(pipe.stages), len(pipe.microbatches), st.start, st.end))
        key = ("step", plan.microbatch_size, plan.schedule, *parts)
        step = self._cache.get(key)
        if step is None:
            orders = [stage_compute_order(plan.pipelines[pi].stages, s,
                                          plan.pipelines[pi].microbatches, plan.schedule)
                      for pi, s in self._where.get(rank, [])]
            step = self._cache[key] = rank_step(_interleave(orders), self.saved, self.fwd,
                                                self.bwd)
        return key, step

    def floor(self, rank: int) -> float:
        """Chameleon's minimum budget for the rank's step (`minimum_budget`, what its
        `BudgetError.minimum` reports): every record swapped, fetched just in time."""
        key, step = self.step(rank)
        fk = ("floor", key)
        if fk not in self._cache:
            self._cache[fk] = floor_bytes(step)
        return self._cache[fk]

    def price(self, rank: int, budget: float, host_Bps: float) -> RankSwap:
        key, step = self.step(rank)
        pk = ("price", key, int(budget), host_Bps)
        if pk not in self._cache:
            self._cache[pk] = price(step, budget, host_Bps)
        return self._cache[pk]


def _interleave(orders: list[list[Instruction]]) -> list[Instruction]:
    """Compute ops of several stage schedules, one from each in turn."""
    if len(orders) == 1:
        return orders[0]
    ops = [[i for i in o if i.op in (Op.FORWARD, Op.BACKWARD)] for o in orders]
    out: list[Instruction] = []
    for k in range(max(map(len, ops), default=0)):
        out += [o[k] for o in ops if k < len(o)]
    return out


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


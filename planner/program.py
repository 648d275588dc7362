"""`Program`: per-rank instruction lists compiled from a `Plan`.

Both interpreters consume the same instructions: the simulator (planner) times them,
the engine (odyssey) executes them. Point-to-point traffic travels on *channels*: one
ordered queue per (src, dst, kind). Senders and receivers visit a channel's microbatches
in the same order under both schedules, so a channel can be a plain FIFO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

from planner.plan import Plan, Stage
from planner.schedule import list_schedule


class Op(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    SEND_ACT = "send_act"
    RECV_ACT = "recv_act"
    SEND_GRAD = "send_grad"
    RECV_GRAD = "recv_grad"
    ALLREDUCE = "allreduce"
    ALLREDUCE_TIED = "allreduce_tied"
    COMMIT = "commit"
    OPTIMIZER_STEP = "optimizer_step"


P2P_OPS = (Op.SEND_ACT, Op.RECV_ACT, Op.SEND_GRAD, Op.RECV_GRAD)


@dataclass(frozen=True)
class Instruction:
    """One step of a rank's program."""

    op: Op
    microbatch: int = -1
    """Microbatch id (compute and p2p ops)."""
    start: int = 0
    """First layer of the range this op covers (compute and all-reduce ops)."""
    end: int = 0
    """One past the last layer of the range."""
    peer: int = -1
    """The other worker id (p2p ops)."""
    group: tuple[int, ...] = ()
    """Worker ids taking part (all-reduce)."""
    tied: int = -1
    """Index of the model's tied parameter group (allreduce_tied); start..end is its
    first member layer on this rank (what the cost model prices)."""

    def __str__(self) -> str:
        if self.op in (Op.FORWARD, Op.BACKWARD):
            return f"{self.op.value}(mb={self.microbatch}, layers={self.start}..{self.end - 1})"
        if self.op in P2P_OPS:
            return f"{self.op.value}(mb={self.microbatch}, peer={self.peer})"
        if self.op is Op.ALLREDUCE:
            return f"allreduce(layers={self.start}..{self.end - 1}, group={list(self.group)})"
        if self.op is Op.ALLREDUCE_TIED:
            return f"allreduce_tied(tied={self.tied}, group={list(self.group)})"
        return self.op.value


@dataclass(frozen=True)
class Channel:
    """A one-directional ordered p2p queue."""

    src: int
    dst: int
    kind: str
    """'act' (forward activations) or 'grad' (gradients flowing back)."""

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.src}-{self.dst}"


@dataclass
class Program:
    """The compiled form of a plan: what each rank executes for one training step."""

    plan: Plan
    instructions: dict[int, list[Instruction]] = field(default_factory=dict)

    def for_rank(self, rank: int) -> list[Instruction]:
        return self.instructions[rank]

    def channels(self) -> list[Channel]:
        """Every p2p channel the program uses, in a deterministic order."""
        seen = set()
        for rank, instrs in self.instructions.items():
            for ins in instrs:
                if ins.op is Op.SEND_ACT:
                    seen.add(Channel(rank, ins.peer, "act"))
                elif ins.op is Op.SEND_GRAD:
                    seen.add(Channel(rank, ins.peer, "grad"))
        return sorted(seen, key=lambda c: (min(c.src, c.dst), max(c.src, c.dst), c.kind, c.src))

    def allreduce_groups(self) -> list[tuple[int, ...]]:
        """Distinct all-reduce member sets (tied groups' included), in a deterministic
        order."""
        groups = {ins.group for instrs in self.instructions.values() for ins in instrs
                  if ins.op in (Op.ALLREDUCE, Op.ALLREDUCE_TIED) and len(ins.group) > 1}
        return sorted(groups)

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "instructions": {
                str(r): [
                    {k: (v.value if isinstance(v, Op) else list(v) if isinstance(v, tuple) else v)
                     for k, v in asdict(i).items()}
                    for i in instrs
                ]
                for r, instrs in self.instructions.items()
            },
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def dump(self) -> str:
        """Human-readable listing, one rank per block."""
        lines = []
        for r in sorted(self.instructions):
            lines.append(f"rank {r}:")
            lines += [f"  {i}" for i in self.instructions[r]]
        return "\n".join(lines)


def _forward_ops(stages: list[Stage], s: int, mb: int) -> list[Instruction]:
    st = stages[s]
    ops = []
    if s > 0:
        ops.append(Instruction(Op.RECV_ACT, mb, peer=stages[s - 1].rank))
    ops.append(Instruction(Op.FORWARD, mb, st.start, st.end))
    if s < len(stages) - 1:
        ops.append(Instruction(Op.SEND_ACT, mb, peer=stages[s + 1].rank))
    return ops


def _backward_ops(stages: list[Stage], s: int, mb: int) -> list[Instruction]:
    st = stages[s]
    ops = []
    if s < len(stages) - 1:
        ops.append(Instruction(Op.RECV_GRAD, mb, peer=stages[s + 1].rank))
    ops.append(Instruction(Op.BACKWARD, mb, st.start, st.end))
    if s > 0:
        ops.append(Instruction(Op.SEND_GRAD, mb, peer=stages[s - 1].rank))
    return ops


def stage_compute_order(stages: list[Stage], s: int, mbs: list[int], schedule: str
                        ) -> list[Instruction]:
    """Stage `s` of a pipeline's forwards and backwards (with their sends and receives) in
    the order `schedule` runs them, when the rank serves that pipeline only."""
    if schedule == "gpipe":
        ops = []
        for m in mbs:
            ops += _forward_ops(stages, s, m)
        for m in mbs:
            ops += _backward_ops(stages, s, m)
        return ops
    # 1F1B: warm up with p-s-1 forwards, then alternate, then drain the backwards.
    p, n = len(stages), len(mbs)
    warmup = min(p - s - 1, n)
    ops = []
    for i in range(warmup):
        ops += _forward_ops(stages, s, mbs[i])
    for i in range(n - warmup):
        ops += _forward_ops(stages, s, mbs[warmup + i])
        ops += _backward_ops(stages, s, mbs[i])
    for i in range(n - warmup, n):
        ops += _backward_ops(stages, s, mbs[i])
    return ops


def compute_orders(plan: Plan) -> dict[int, list[Instruction]]:
    """Each rank's forwards and backwards (with their sends and receives) for one step, in
    the order it runs them: the schedule's formula, or for shared stages a feasible
    interleaving found by `planner.schedule.list_schedule`."""
    compute: dict[int, list[Instruction]] = {}
    if plan.has_shared_stages:
        pos = {(pi, r): si for pi, p in enumerate(plan.pipelines) for si, r in enumerate(p.ranks)}
        for r, ops in list_schedule(plan).items():
            compute[r] = []
            for kind, pi, m in ops:
                stages = plan.pipelines[pi].stages
                expand = _forward_ops if kind == "F" else _backward_ops
                compute[r] += expand(stages, pos[(pi, r)], m)
    else:
        for pipe in plan.pipelines:
            for s, st in enumerate(pipe.stages):
                compute[st.rank] = stage_compute_order(pipe.stages, s, pipe.microbatches,
                                                       plan.schedule)
    return compute


def tied_groups(plan: Plan, tied: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per tied group (its member layers): the ranks holding any member, sorted. The
    group's gradient is all-reduced over exactly these ranks."""
    return [tuple(sorted({r for layer in layers for r in plan.holders(layer)}))
            for layers in tied]


def compile_plan(plan: Plan, tied: Sequence[Sequence[int]] = ()) -> Program:
    """Compile a validated plan into per-rank instruction lists.

    Each rank: its stage's pipeline schedule, then one all-reduce per layer group it
    shares with other ranks (latest layers first: their gradients are ready first),
    then one all-reduce per tied parameter group it holds a member of (`tied`: each
    group's member layers; the ranks holding any member sum the members' gradients in
    one all-reduce, which replaces the layer groups' all-reduce for those parameters;
    emitted even on a lone holder, which sums its members locally), then commit and
    optimizer step.
    """
    plan.validate()
    program = Program(plan)
    groups = plan.layer_groups()
    for r, ops in compute_orders(plan).items():
        st = plan.stage(r)
        for (a, b), members in sorted(groups, key=lambda g: -g[0][0]):
            if r in members and len(members) > 1:
                ops.append(Instruction(Op.ALLREDUCE, start=a, end=b, group=members))
        for t, (layers, members) in enumerate(zip(tied, tied_groups(plan, tied))):
            if r in members:
                first = next(i for i in sorted(layers) if i in st.layers)
                ops.append(Instruction(Op.ALLREDUCE_TIED, start=first, end=first + 1,
                                       group=members, tied=t))
        ops.append(Instruction(Op.COMMIT))
        ops.append(Instruction(Op.OPTIMIZER_STEP, start=st.start, end=st.end))
        program.instructions[r] = ops
    return program

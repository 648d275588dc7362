"""Lowering: instruction lists -> flat tuples the event loop runs without lookups.

Each lowered step is (code, duration, extra, microbatch, instruction) where `extra` is
the activation-byte delta (compute), the channel (src, dst, kind) (p2p), or
(barrier key, member count, breakdown field, members) (all-reduce, commit); the
instruction (or the tuple of its fields) is kept for error messages only.

`lower_program` lowers any `Program`. `lower_pipelines` produces the same steps straight
from a plan's representative pipelines without building `Instruction` objects (the
search simulates many thousands of steps per candidate): it mirrors
`planner.program`'s GPipe and 1F1B orders, fusing each [recv] + compute + [send] into
one step, and a test keeps the two in step.
"""

from __future__ import annotations

from collections import deque

from planner.cost import CostModel
from planner.memory import MemoryModel, RankMemory
from planner.plan import Pipeline, Plan, runs_of
from planner.program import Instruction, Op, Program

Lowered = tuple[dict[int, list[tuple]], dict[int, RankMemory], dict]

COMPUTE, SEND, RECV, BARRIER, LOCAL, MACRO = range(6)
_CAT = {Op.ALLREDUCE: "allreduce_s", Op.ALLREDUCE_TIED: "allreduce_s", Op.COMMIT: "commit_s"}


def channel(chans: dict, src: int, dst: int, kind: str) -> list:
    """The shared state of channel (src, dst, kind): [queue, free time, waiter, key]."""
    key = (src, dst, kind)
    c = chans.get(key)
    if c is None:
        c = chans[key] = [deque(), 0.0, None, key]
    return c


def describe(ins: Instruction | tuple, mb: int = -1) -> str:
    """Text of a lowered step's instruction (`ins` may be a tuple of its fields; a
    fused step's tuple holds several, with microbatch -1 standing for `mb`)."""
    if isinstance(ins, Instruction):
        return str(ins)
    if ins and isinstance(ins[0], tuple):
        return " + ".join(describe(part, mb) for part in ins)
    fields = list(ins)
    if len(fields) > 1 and fields[1] == -1 and mb >= 0:
        fields[1] = mb
    return str(Instruction(*fields))


def static_memory(mem: MemoryModel, ranges: set[tuple[int, int]]) -> RankMemory:
    """Parameters, gradients and optimizer state of the union of layer ranges."""
    layers = {layer for a, b in ranges for layer in range(a, b)}
    params = grads = opt = 0.0
    for a, b in runs_of(sorted(layers)):
        st = mem.static(a, b + 1)
        params, grads, opt = params + st.params, grads + st.grads, opt + st.optimizer
    return RankMemory(params, grads, opt, 0.0, mem.config.reserve_bytes)


def lower_program(program: Program, cost: CostModel,
                  overrides: dict | None = None) -> Lowered:
    """(lowered steps per rank, static memory per rank, channels) of any program."""
    plan = program.plan
    mb = plan.microbatch_size
    cuts = cost.boundaries(plan)
    everyone = tuple(sorted(program.instructions))
    mem = cost.memory
    cache: dict = {}
    chans: dict = {}
    lowered: dict[int, list[tuple]] = {}
    static: dict[int, RankMemory] = {}
    for rank, instrs in program.instructions.items():
        out: list[tuple] = []
        held: set[tuple[int, int]] = set()
        seen: dict = {}
        for ins in instrs:
            op = ins.op
            if op is Op.FORWARD or op is Op.BACKWARD:
                key = (op, ins.start, ins.end, cost.speed_factor(rank))
                if key not in cache:
                    act = mem.microbatch_bytes(ins.start, ins.end, mb)
                    cache[key] = (cost.instruction_s(ins, rank, mb),
                                  act if op is Op.FORWARD else -act)
                d, act = cache[key]
                out.append((COMPUTE, d, act, ins.microbatch, ins))
                held.add((ins.start, ins.end))
            elif op is Op.SEND_ACT or op is Op.SEND_GRAD:
                key = (op, rank, ins.peer)
                if key not in cache:
                    d = cost.instruction_s(ins, rank, mb, cost.boundary_of(ins, rank, cuts))
                    kind = "act" if op is Op.SEND_ACT else "grad"
                    cache[key] = (d, channel(chans, rank, ins.peer, kind))
                d, chan = cache[key]
                out.append((SEND, d, chan, ins.microbatch, ins))
            elif op is Op.RECV_ACT or op is Op.RECV_GRAD:
                key = (op, rank, ins.peer)
                if key not in cache:
                    kind = "act" if op is Op.RECV_ACT else "grad"
                    cache[key] = channel(chans, ins.peer, rank, kind)
                out.append((RECV, 0.0, cache[key], ins.microbatch, ins))
            elif op is Op.ALLREDUCE or op is Op.COMMIT or op is Op.ALLREDUCE_TIED:
                group = everyone if op is Op.COMMIT else ins.group
                full = (overrides or {}).get((ins.start, ins.end, group), group)
                ident = (op, ins.start, ins.end, group)
                n = seen.get(ident, 0)
                seen[ident] = n + 1
                if ident not in cache:
                    # a tied group is priced as its first member layer's gradient (an
                    # upper bound: that layer may hold more than the tied weight)
                    cache[ident] = (cost.allreduce_s(full, cost.grad_bytes(ins.start, ins.end))
                                    if op is Op.ALLREDUCE_TIED
                                    else cost.instruction_s(ins, rank, mb, group=full))
                out.append((BARRIER, cache[ident], ((ident, n), len(group), _CAT[op], group),
                            -1, ins))
            elif op is Op.OPTIMIZER_STEP:
                out.append((LOCAL, cost.optimizer_s(ins.start, ins.end), None, -1, ins))
                held.add((ins.start, ins.end))
            else:
                raise ValueError(f"rank {rank}: unknown instruction {ins}")
        static[rank] = static_memory(mem, held)
        lowered[rank] = out
    return lowered, static, chans


def lower_pipelines(plan: Plan, pipelines: list[tuple[Pipeline, list[int]]],
                    groups: list[tuple[tuple[int, int], tuple[int, ...]]],
                    representative: dict[int, int], cost: CostModel,
                    overrides: dict) -> Lowered:
    """Lower representative pipelines directly (same steps as `lower_program` of their
    compiled program, fused, with microbatch ids left out).

    `pipelines`: (Pipeline, microbatch ids) per representative; `groups`: the full
    plan's all-reduce groups ((start, end), members), latest first; `representative`:
    full rank -> representative rank. Fills `overrides` like `reduce_plan`.
    """
    mb = plan.microbatch_size
    mem = cost.memory
    everyone = tuple(sorted(st.rank for pipe, _ in pipelines for st in pipe.stages))
    lowered: dict[int, list[tuple]] = {}
    static: dict[int, RankMemory] = {}
    chans: dict = {}
    commit = cost.commit_s()
    for pipe, mbs in pipelines:
        stages = pipe.stages
        p = len(stages)
        for s, st in enumerate(stages):
            r, a, e = st.rank, st.start, st.end
            act = mem.microbatch_bytes(a, e, mb)
            prev = stages[s - 1].rank if s > 0 else None
            nxt = stages[s + 1].rank if s < p - 1 else None
            send_act = recv_grad = recv_act = send_grad = None
            send_act_d = send_grad_d = 0.0
            if nxt is not None:
                send_act_d = cost.p2p_s(r, nxt, cost.boundary_bytes(e - 1, mb))
                send_act = channel(chans, r, nxt, "act")
                recv_grad = channel(chans, nxt, r, "grad")
            if prev is not None:
                send_grad_d = cost.p2p_s(r, prev, cost.boundary_bytes(a - 1, mb))
                recv_act = channel(chans, prev, r, "act")
                send_grad = channel(chans, r, prev, "grad")
            # fused steps: [recv] + compute + [send]; only the recv can block
            f_tag = tuple(t for t in (
                (Op.RECV_ACT, -1, 0, 0, prev) if prev is not None else None,
                (Op.FORWARD, -1, a, e),
                (Op.SEND_ACT, -1, 0, 0, nxt) if nxt is not None else None) if t)
            b_tag = tuple(t for t in (
                (Op.RECV_GRAD, -1, 0, 0, nxt) if nxt is not None else None,
                (Op.BACKWARD, -1, a, e),
                (Op.SEND_GRAD, -1, 0, 0, prev) if prev is not None else None) if t)
            f_x = (recv_act, act, send_act, send_act_d)
            b_x = (recv_grad, -act, send_grad, send_grad_d)
            k = cost.speed_factor(r)
            f_d, b_d = cost.forward_s(a, e, mb) * k, cost.backward_s(a, e, mb) * k
            # microbatch ids are not carried (-1): the order is right by construction
            fwd, bwd = (MACRO, f_d, f_x, -1, f_tag), (MACRO, b_d, b_x, -1, b_tag)
            n = len(mbs)
            if plan.schedule == "gpipe":
                out: list[tuple] = [fwd] * n + [bwd] * n
            else:
                warm = min(p - s - 1, n)
                out = [fwd] * warm + [fwd, bwd] * (n - warm) + [bwd] * warm
            app = out.append
            for (ga, gb), full in groups:
                if a <= ga and gb <= e:
                    rep_group = tuple(sorted({representative[x] for x in full}))
                    overrides[(ga, gb, rep_group)] = full
                    d = cost.allreduce_s(full, cost.grad_bytes(ga, gb))
                    ident = (Op.ALLREDUCE, ga, gb, rep_group)
                    app((BARRIER, d, ((ident, 0), len(rep_group), "allreduce_s", rep_group),
                         -1, (Op.ALLREDUCE, -1, ga, gb, -1, rep_group)))
            ident = (Op.COMMIT, 0, 0, everyone)
            app((BARRIER, commit, ((ident, 0), len(everyone), "commit_s", everyone), -1,
                 (Op.COMMIT,)))
            app((LOCAL, cost.optimizer_s(a, e), None, -1, (Op.OPTIMIZER_STEP, -1, a, e)))
            lowered[r] = out
            static[r] = static_memory(mem, {(a, e)})
    return lowered, static, chans

"""Event simulator core: run a (lowered) `Program` in simulated time.

Rules: compute ops are sequential per rank; sends are asynchronous (the sender pays
`send_overhead_s`, the message arrives after the transfer, transfers on one channel are
serialised); a recv waits for the next message of its FIFO channel (src, dst, kind); an
all-reduce starts when every member reached it and ends for all together; commit is a
barrier of every rank. Each rank runs until it blocks, so the result does not depend on
the order ranks are visited. A program where no rank can move while some have not
finished is a deadlock: `DeadlockError` says where each blocked rank is and why.

`planner.simulate` sits on top: `simulate_plan` picks the reduced (`planner.reduce`) or
the full simulation of a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import CostModel
from planner.lowering import BARRIER, COMPUTE, MACRO, RECV, SEND, describe, lower_program
from planner.memory import RankMemory
from planner.plan import Plan
from planner.program import Program
from profiler.units import format_size


class SimulationError(RuntimeError):
    """A program the simulator cannot run (mismatched channel order, leftover sends)."""


class DeadlockError(SimulationError):
    """No rank can make progress; `blocked` maps rank -> where and why it waits."""

    def __init__(self, blocked: dict[int, str], finished: list[int]):
        self.blocked = blocked
        self.finished = finished
        lines = [f"rank {r}: {why}" for r, why in sorted(blocked.items())]
        super().__init__("deadlock: no rank can make progress\n  " + "\n  ".join(lines)
                         + (f"\n  finished ranks: {finished}" if finished else ""))


@dataclass
class RankBreakdown:
    """Where one rank's step time went (seconds); the six parts sum to the step time."""

    compute_s: float = 0.0
    """Forward and backward."""
    p2p_s: float = 0.0
    """Send overhead plus waiting in recv for the transfer itself."""
    bubble_s: float = 0.0
    """Idle: waiting for upstream compute, for slower all-reduce members, for the end."""
    allreduce_s: float = 0.0
    """Exposed all-reduce time (after the last member arrived)."""
    commit_s: float = 0.0
    """Commit decision."""
    optimizer_s: float = 0.0
    """Optimizer step."""
    end_s: float = 0.0
    """When this rank finished its program."""
    memory: RankMemory | None = None
    """Peak memory (activations tracked through the schedule)."""

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.p2p_s + self.bubble_s + self.allreduce_s
                + self.commit_s + self.optimizer_s)


@dataclass
class SimResult:
    """Predicted step time with per-rank breakdown and peak memory."""

    step_time_s: float
    """Time until the last rank finished its optimizer step."""
    ranks: dict[int, RankBreakdown]
    """Per-rank breakdown."""
    plan: Plan | None = None
    """The plan simulated (when known)."""

    def peak_memory(self) -> dict[int, float]:
        return {r: (b.memory.total if b.memory else 0.0) for r, b in self.ranks.items()}

    @property
    def max_memory(self) -> float:
        return max(self.peak_memory().values(), default=0.0)

    def mean_breakdown(self) -> dict[str, float]:
        n = max(1, len(self.ranks))
        keys = ("compute_s", "p2p_s", "bubble_s", "allreduce_s", "commit_s", "optimizer_s")
        return {k: sum(getattr(b, k) for b in self.ranks.values()) / n for k in keys}

    def summary(self) -> str:
        parts = ", ".join(f"{k[:-2]} {v * 1e3:.2f} ms"
                          for k, v in self.mean_breakdown().items())
        return (f"step {self.step_time_s * 1e3:.2f} ms; mean per rank: {parts}; "
                f"peak memory {format_size(self.max_memory)}")


class State:
    """Per-rank clocks, breakdowns and activation counters of a (partial) run."""

    def __init__(self, ranks: list[int]):
        self.clock = dict.fromkeys(ranks, 0.0)
        self.bd = {r: RankBreakdown() for r in ranks}
        self.live = dict.fromkeys(ranks, 0.0)
        self.peak = dict.fromkeys(ranks, 0.0)


def simulate(program: Program, cost: CostModel, overrides: dict | None = None) -> SimResult:
    """Run `program` in simulated time with durations from `cost` (a `CostModel`).

    `overrides` maps (start, end, group) of an all-reduce to the member list used for
    its cost (the reduced programs of `simulate_plan` use it).
    """
    lowered, static, chans = lower_program(program, cost, overrides)
    state = State(sorted(lowered))
    run_lowered(lowered, state, cost.config.send_overhead_s, chans)
    return finish(state, static, program.plan)


def finish(state: State, static: dict[int, RankMemory], plan: Plan | None) -> SimResult:
    """Close a run: idle tail into bubble, memory into each breakdown."""
    step = max(state.clock.values(), default=0.0)
    for r, b in state.bd.items():
        b.end_s = state.clock[r]
        b.bubble_s += step - state.clock[r]
        st = static[r]
        b.memory = RankMemory(st.params, st.grads, st.optimizer, state.peak[r], st.reserve)
    return SimResult(step, state.bd, plan)


def run_lowered(lowered: dict[int, list[tuple]], state: State, send_overhead: float,
                chans: dict | None = None) -> None:
    """Advance every rank through its lowered program (see the module docstring).

    Channels are mutable [queue of (mb, arrival, transfer), free time, waiting rank,
    key] lists shared by the lowered steps (`planner.lowering.channel`).
    """
    ranks = sorted(lowered)
    clock, bd, live, peak = state.clock, state.bd, state.live, state.peak
    pc = dict.fromkeys(ranks, 0)
    barriers: dict[tuple, dict[int, float]] = {}
    ready = list(reversed(ranks))
    while ready:
        r = ready.pop()
        prog = lowered[r]
        i, t, b = pc[r], clock[r], bd[r]
        lv, pk = live[r], peak[r]
        comp = p2p = bub = 0.0
        n = len(prog)
        while i < n:
            code, d, x, mbid, ins = prog[i]
            if code == MACRO:  # [recv] + compute + [send]
                rc, act, sc, sd = x
                if rc is not None:
                    q = rc[0]
                    if not q:
                        rc[2] = r
                        break
                    got, arrival, dur = q.popleft()
                    if got != mbid:
                        raise SimulationError(
                            f"rank {r} step #{i} {describe(ins, mbid)}: channel "
                            f"{_chan_name(rc)} delivers microbatch {got} first (send and "
                            "recv orders differ)")
                    if arrival > t:
                        wait = arrival - t
                        comm = wait if wait < dur else dur
                        p2p += comm
                        bub += wait - comm
                        t = arrival
                t += d
                comp += d
                lv += act
                if lv > pk:
                    pk = lv
                if sc is not None:
                    start = sc[1] if sc[1] > t else t
                    sc[1] = start + sd
                    sc[0].append((mbid, start + sd, sd))
                    if send_overhead:
                        t += send_overhead
                        p2p += send_overhead
                    if sc[2] is not None:
                        ready.append(sc[2])
                        sc[2] = None
            elif code == COMPUTE:
                t += d
                comp += d
                lv += x
                if lv > pk:
                    pk = lv
            elif code == SEND:
                start = x[1] if x[1] > t else t
                x[1] = start + d
                x[0].append((mbid, start + d, d))
                if send_overhead:
                    t += send_overhead
                    p2p += send_overhead
                if x[2] is not None:
                    ready.append(x[2])
                    x[2] = None
            elif code == RECV:
                q = x[0]
                if not q:
                    x[2] = r
                    break
                got, arrival, dur = q.popleft()
                if got != mbid:
                    raise SimulationError(
                        f"rank {r} instruction #{i} {describe(ins)}: channel "
                        f"{_chan_name(x)} delivers microbatch {got} first (send and "
                        "recv orders differ)")
                if arrival > t:
                    wait = arrival - t
                    comm = wait if wait < dur else dur
                    p2p += comm
                    bub += wait - comm
                    t = arrival
            elif code == BARRIER:
                arrived = barriers.setdefault(x[0], {})
                arrived[r] = t
                if len(arrived) < x[1]:
                    break
                b.bubble_s += bub
                bub = 0.0
                first_end = max(arrived.values())
                cat = x[2]
                for m, a in arrived.items():
                    bm = bd[m]
                    bm.bubble_s += first_end - a
                    setattr(bm, cat, getattr(bm, cat) + d)
                    if m != r:
                        pc[m] += 1
                        clock[m] = first_end + d
                        ready.append(m)
                del barriers[x[0]]
                t = first_end + d
            else:  # LOCAL (optimizer step)
                t += d
                b.optimizer_s += d
            i += 1
        pc[r], clock[r], live[r], peak[r] = i, t, lv, pk
        b.compute_s += comp
        b.p2p_s += p2p
        b.bubble_s += bub
    unfinished = [r for r in ranks if pc[r] < len(lowered[r])]
    if unfinished:
        blocked = {r: _why(r, pc, lowered, barriers) for r in unfinished}
        raise DeadlockError(blocked, [r for r in ranks if r not in blocked])
    leftover = [(c[3], len(c[0])) for c in (chans or {}).values() if c[0]]
    if leftover:
        desc = ", ".join(f"{_chan_name(k)}: {n}" for k, n in sorted(leftover))
        raise SimulationError(f"messages sent but never received ({desc})")


def _chan_name(c) -> str:
    key = c[3] if isinstance(c, list) else c
    return f"{key[2]}-{key[0]}-{key[1]}"


def _why(r: int, pc: dict, lowered: dict, barriers: dict) -> str:
    code, _, x, mbid, ins = lowered[r][pc[r]]
    where = f"blocked at #{pc[r]} {describe(ins, mbid)}: "
    if code == MACRO:
        code, x = RECV, x[0]
    if code == RECV:
        key = x[3]
        src = key[0]
        if src not in lowered:
            state = f"rank {src} is not in the program"
        elif pc[src] >= len(lowered[src]):
            state = f"sender rank {src} finished without sending it"
        else:
            step = lowered[src][pc[src]]
            state = f"sender rank {src} is blocked at #{pc[src]} {describe(step[4], step[3])}"
        return where + f"channel {_chan_name(key)} is empty ({state})"
    if code == BARRIER:
        here = set(barriers.get(x[0], {}))
        missing = sorted(set(x[3]) - here)
        return where + (f"waits for {missing} to reach it (arrived: {sorted(here)}); "
                        + "; ".join(f"rank {m} is at #{pc[m]} "
                                    f"{describe(lowered[m][pc[m]][4], lowered[m][pc[m]][3])}"
                                    if pc[m] < len(lowered[m]) else f"rank {m} finished"
                                    for m in missing if m in lowered))
    return where + "not runnable"

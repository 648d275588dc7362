"""Per-rank op orders for any route topology, found by a unit-time list simulation.

Plans whose ranks each serve one pipeline use the textbook GPipe/1F1B formulas
(`planner.program`). When a rank serves several pipelines (a *shared stage*, as in a
rerouted plan), its forwards and backwards from different pipelines must interleave in
an order that cannot deadlock. We find one by simulating the plan with unit-ish op
times: each idle rank starts a ready op (1F1B: backward first, forwards limited by the
in-flight budget; GPipe: forward first). Channels are FIFO in the simulation exactly as
at run time, so the recorded per-rank orders are a feasible execution, and fixed
per-rank orders that are feasible once are deadlock-free under any op durations.
"""

from __future__ import annotations

import heapq
from collections import deque

from planner.plan import Plan, PlanError

# (kind 'F' or 'B', pipeline index, microbatch id)
ScheduledOp = tuple[str, int, int]


def list_schedule(plan: Plan) -> dict[int, list[ScheduledOp]]:
    """Return each rank's order of forward/backward ops for one step of `plan`."""
    pipes = plan.pipelines
    pos = {(pi, r): si for pi, p in enumerate(pipes) for si, r in enumerate(p.ranks)}
    budget: dict[int, int] = {}
    for (pi, r), si in pos.items():
        budget[r] = budget.get(r, 0) + len(pipes[pi].stages) - si
    # candidate ops per rank, in priority order (microbatch order within each pipeline)
    todo: dict[int, list[tuple[int, int]]] = {r: [] for r in plan.ranks}
    for r in plan.ranks:
        entries = [(idx, pi, m) for pi, p in enumerate(pipes) if (pi, r) in pos
                   for idx, m in enumerate(p.microbatches)]
        todo[r] = [(pi, m) for _, pi, m in sorted(entries)]
    f_left = {r: list(todo[r]) for r in plan.ranks}
    b_left = {r: list(todo[r]) for r in plan.ranks}
    f_done: set[tuple[int, int, int]] = set()
    b_done: set[tuple[int, int, int]] = set()
    queues: dict[tuple[int, int, str], deque] = {}
    inflight = dict.fromkeys(plan.ranks, 0)
    order: dict[int, list[ScheduledOp]] = {r: [] for r in plan.ranks}
    busy: dict[int, float] = {}
    events: list[tuple[float, int, str, int, int]] = []  # (time, rank, kind, pipe, mb)
    total = 2 * sum(len(p.stages) * len(p.microbatches) for p in pipes)
    finished = 0
    now = 0.0

    def head(src: int, dst: int, kind: str, item: tuple[int, int]) -> bool:
        q = queues.get((src, dst, kind))
        return bool(q) and q[0] == item

    def ready_forward(r: int):
        for pi, m in f_left[r]:
            si = pos[(pi, r)]
            if si == 0 or head(pipes[pi].stages[si - 1].rank, r, "act", (pi, m)):
                return pi, m
        return None

    def ready_backward(r: int):
        for pi, m in b_left[r]:
            si = pos[(pi, r)]
            if (pi, m, si) not in f_done:
                continue
            last = si == len(pipes[pi].stages) - 1
            if last or head(pipes[pi].stages[si + 1].rank, r, "grad", (pi, m)):
                return pi, m
        return None

    def start(r: int, kind: str, pi: int, m: int) -> None:
        si = pos[(pi, r)]
        stage = pipes[pi].stages[si]
        if kind == "F":
            f_left[r].remove((pi, m))
            inflight[r] += 1
            if si > 0:
                queues[(pipes[pi].stages[si - 1].rank, r, "act")].popleft()
            dur = 1.0 * (stage.end - stage.start)
        else:
            b_left[r].remove((pi, m))
            if si < len(pipes[pi].stages) - 1:
                queues[(pipes[pi].stages[si + 1].rank, r, "grad")].popleft()
            dur = 2.0 * (stage.end - stage.start)
        order[r].append((kind, pi, m))
        busy[r] = now + dur
        heapq.heappush(events, (now + dur, r, kind, pi, m))

    while finished < total:
        for r in plan.ranks:
            if r in busy:
                continue
            b = ready_backward(r)
            f = ready_forward(r)
            if plan.schedule == "gpipe":
                choice = ("F", *f) if f else ("B", *b) if b else None
            else:
                can_f = f is not None and inflight[r] < budget[r]
                choice = ("B", *b) if b else ("F", *f) if can_f else None
            if choice:
                start(r, *choice)
        if not events:
            raise PlanError("plan cannot be scheduled: every rank waits on another "
                            f"(left: { {r: len(f_left[r]) + len(b_left[r]) for r in f_left} })")
        now, r, kind, pi, m = heapq.heappop(events)
        del busy[r]
        finished += 1
        si = pos[(pi, r)]
        if kind == "F":
            f_done.add((pi, m, si))
            if si < len(pipes[pi].stages) - 1:
                key = (r, pipes[pi].stages[si + 1].rank, "act")
                queues.setdefault(key, deque()).append((pi, m))
        else:
            b_done.add((pi, m, si))
            inflight[r] -= 1
            if si > 0:
                key = (r, pipes[pi].stages[si - 1].rank, "grad")
                queues.setdefault(key, deque()).append((pi, m))
    return order

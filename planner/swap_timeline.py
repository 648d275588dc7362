"""Timeline simulator: compute lane + swap-out lane + prefetch lane over one profiled step.

The compute lane replays the profile's timestamps (stalls already removed); a stall at
an unpack (prefetch not finished) or at a pack (budget full, waiting for a swap-out)
shifts all later compute. Each copy lane is FIFO. Resident bytes are the bytes the
executor holds on the device: kept tensors from pack to free, swapped tensors from pack
to the end of their swap-out and from prefetch start to their last unpack, recomputed
tensors from their first to last unpack.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from profiler.step_profile import StageId, StepProfile

KEEP, SWAP, RECOMPUTE = "keep", "swap", "recompute"


@dataclass
class SimResult:
    """What the simulator predicts for one step under a set of decisions."""

    peak_bytes: int
    """Highest resident saved bytes."""
    peak_t: float
    """Profile time of that peak."""
    at_peak: list[int]
    """rids resident at the peak."""
    stall_s: float
    """Compute time lost waiting for copies (and for recompute)."""
    step_time: float
    """Predicted step time (profile step time + stall)."""
    out_bytes: int = 0
    """Bytes copied device -> host."""
    in_bytes: int = 0
    """Bytes copied host -> device."""
    recompute_bytes: int = 0
    """Bytes recomputed instead of moved."""
    out_start: dict[int, float] = field(default_factory=dict)
    """rid -> predicted start of its swap-out."""
    in_start: dict[int, float] = field(default_factory=dict)
    """rid -> predicted start of its prefetch."""


def need_times(profile: StepProfile, modes: list[str]) -> list[float | None]:
    """First time each record must be on the device: its own first unpack, or earlier if
    a recomputed tensor needs it as its source."""
    need = [r.unpack_t for r in profile.records]
    for r in profile.records:
        if modes[r.rid] == RECOMPUTE and r.recompute_src is not None and r.unpack_t is not None:
            s = r.recompute_src
            need[s] = r.unpack_t if need[s] is None else min(need[s], r.unpack_t)
    return need


def simulate(profile: StepProfile, modes: list[str], triggers: list[StageId | None],
             bw_out: float, bw_in: float, budget: int | None = None,
             recompute_Bps: float = 20e9) -> SimResult:
    """Replay one step. With `budget` the executor's guards are modelled (waits for
    swap-outs at packs, prefetches deferred until they fit); without it, the natural
    peak of the decisions is reported."""
    recs = profile.records
    need = need_times(profile, modes)
    end_t = profile.step_time
    ev: list[tuple[float, int, int, int]] = []  # (time, priority, seq, rid)
    for r in recs:
        ev.append((r.pack_t, 3, r.rid, r.rid))
        m = modes[r.rid]
        last = r.last_unpack_t if r.last_unpack_t is not None else r.unpack_t
        if m == KEEP:
            ev.append((r.free_t if r.free_t is not None else (last or end_t), 2, r.rid, r.rid))
        elif need[r.rid] is not None:
            ev.append((need[r.rid], 1, r.rid, r.rid))  # unpack (fetch must be done)
            done = max(last or need[r.rid], need[r.rid])
            ev.append((done, 2, r.rid, r.rid))  # dropped after last unpack
        if m == SWAP and need[r.rid] is not None:
            tr = triggers[r.rid]
            tt = profile.bwd_t.get(tr, need[r.rid]) if tr is not None else need[r.rid]
            ev.append((min(tt, need[r.rid]), 0, r.rid, r.rid))
    ev.sort()

    delay = stall = 0.0
    resident = peak = 0
    peak_t = 0.0
    at_peak: list[int] = []
    live: set[int] = set()
    outs: list[tuple[float, int]] = []  # heap of (end, rid)
    out_free = in_free = 0.0
    out_end: dict[int, float] = {}
    in_end: dict[int, float] = {}
    deferred: list[int] = []
    res = SimResult(0, 0.0, [], 0.0, end_t)

    def retire(now: float) -> None:
        nonlocal resident
        while outs and outs[0][0] <= now:
            _, rid = heapq.heappop(outs)
            if rid in live and rid not in in_end:
                live.discard(rid)
                resident -= recs[rid].nbytes

    def add(rid: int, t: float) -> None:
        nonlocal resident, peak, peak_t, at_peak
        live.add(rid)
        resident += recs[rid].nbytes
        if resident > peak:
            peak, peak_t, at_peak = resident, t, list(live)

    def fetch(rid: int, now: float) -> None:
        nonlocal in_free
        start = max(now, in_free, out_end.get(rid, 0.0))
        in_free = in_end[rid] = start + recs[rid].nbytes / bw_in
        res.in_start[rid] = start
        fetched.append(rid)
        res.in_bytes += recs[rid].nbytes
        add(rid, now)

    fetched: list[int] = []  # prefetched, first use still ahead (eviction candidates)

    def wait_for_outs(n: int, now: float) -> float:
        """Wait for swap-outs to finish until n more bytes fit; the time it is then."""
        nonlocal stall, delay
        while outs and resident + n > budget:  # type: ignore[operator]
            wait_end = outs[0][0]
            if wait_end > now:
                stall += wait_end - now
                delay += wait_end - now
                now = wait_end
            retire(now)
        return now

    def make_room(n: int, now: float) -> None:
        """Executor guard at a use: wait for swap-outs, then drop unused prefetches."""
        nonlocal resident
        wait_for_outs(n, now)
        while fetched and resident + n > budget:  # type: ignore[operator]
            v = fetched.pop()
            if v in live:
                live.discard(v)
                resident -= recs[v].nbytes
                in_end.pop(v, None)
                deferred.insert(0, v)

    def try_deferred(now: float) -> None:
        while deferred and resident + recs[deferred[0]].nbytes <= budget:  # type: ignore
            fetch(deferred.pop(0), now)

    for t, prio, _, rid in ev:
        now = t + delay
        retire(now)
        r, m = recs[rid], modes[rid]
        if prio == 3:  # pack
            if budget is not None and m != RECOMPUTE:
                now = wait_for_outs(r.nbytes, now)
            if m == RECOMPUTE:
                continue
            add(rid, now)
            if m == SWAP:
                start = max(now, out_free)
                out_free = out_end[rid] = start + r.nbytes / bw_out
                res.out_start[rid] = start
                res.out_bytes += r.nbytes
                heapq.heappush(outs, (out_free, rid))
        elif prio == 0:  # prefetch trigger
            if rid in in_end or rid in live:
                continue
            if budget is not None and (deferred or resident + r.nbytes > budget):
                deferred.append(rid)
            else:
                fetch(rid, now)
        elif prio == 1:  # first unpack: the tensor must be there
            if m == RECOMPUTE:
                if budget is not None:
                    make_room(r.nbytes, now)
                    now = t + delay
                cost = r.nbytes / recompute_Bps
                stall += cost
                delay += cost
                res.recompute_bytes += r.nbytes
                add(rid, now)
                continue
            if rid in deferred:
                deferred.remove(rid)
            if rid in fetched:
                fetched.remove(rid)
            if rid not in in_end and rid not in live:
                if budget is not None:
                    make_room(r.nbytes, now)
                    now = t + delay
                fetch(rid, now)
                fetched.remove(rid)
            if rid in in_end and in_end[rid] > now:
                stall += in_end[rid] - now
                delay += in_end[rid] - now
        else:  # free / drop
            if rid in live:
                live.discard(rid)
                resident -= r.nbytes
            if budget is not None:
                try_deferred(now)
    res.peak_bytes, res.peak_t, res.at_peak = peak, peak_t, at_peak
    res.stall_s, res.step_time = stall, end_t + delay
    return res

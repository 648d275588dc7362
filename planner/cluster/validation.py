"""The simulator checked against the runtime on one trace: the job, its default trace, and
how a measured timeline and a simulated one are compared.

`benchmarks/sim_vs_runtime.py` runs the job under `odyssey run` (emulated compute),
drives the trace into it and hands the applied events and committed steps here; the
simulator replays the same events. Compared: throughput per phase between applied
events, cumulative samples (largest gap in steps) and the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from planner.cluster.membership import ClusterConfig, Membership
from planner.cluster.sim import PolicyResult
from planner.cluster.traces import TraceError, TraceEvent, initial_nodes

DP, PP, LAYERS, F_MS, B_MS, MBS, MB = 2, 4, 8, 10.0, 20.0, 8, 2
"""The job: DP x PP ranks, LAYERS emulated layers of F_MS / B_MS, MBS microbatches of MB."""
WORLD = DP * PP
GB = MBS * MB
"""Samples per step."""
DEFAULT_TRACE = [(6.0, "remove", "node5"), (18.0, "remove", "node2"), (30.0, "add", "node5"),
                 (44.0, "remove", "node1"), (56.0, "add", "node2")]
"""(seconds, kind, node) after the WORLD initial nodes; node1 is lost after node5's return
at a place that is the same in both rank orders (see `rank_order_mismatches`)."""
LOSS = "kill"
"""Kind of an applied event that lost a node (the runtime's injection kind)."""


class RankedChange(Protocol):
    """What the runtime does for one trace event (e.g. `launch.replay_trace.Injection`)."""

    rank: int
    """The rank killed, or the rank the replacement worker gets."""


def default_trace() -> list[TraceEvent]:
    return [*initial_nodes(WORLD), *(TraceEvent(t, k, n) for t, k, n in DEFAULT_TRACE)]


def rank_order_mismatches(events: list[TraceEvent], changes: Sequence[RankedChange],
                          world: int | None = None) -> list[str]:
    """Losses after t=0 where the lost node's place in rank order differs between the
    simulator (slots: a returning node takes the lowest free one) and the runtime (launch
    ranks, replacements numbered on). `changes`: the runtime's rank for each event after
    t=0, in time order; `world`: nodes up at t=0 (default: those the trace adds then)."""
    world = world or sum(1 for e in events if e.time_s <= 0)
    later = sorted((e for e in events if e.time_s > 0), key=lambda e: e.time_s)
    if not world or len(later) != len(changes):
        raise TraceError(f"{len(changes)} runtime changes for {len(later)} events after t=0 "
                         f"on {world} initial nodes")
    mship = Membership(ClusterConfig(num_nodes=1, gpus_per_node=world, trace_node_gpus=1))
    for e in initial_nodes(world):
        mship.apply(e)
    live = set(range(world))
    out = []
    for ev, change in zip(later, changes):
        if ev.kind == "remove":
            sim_pos = mship.members().index(mship.ranks_of_node(ev.node)[0])
            run_pos = sorted(live).index(change.rank)
            if sim_pos != run_pos:
                out.append(f"t={ev.time_s:.1f}s {ev.node}: place {sim_pos} in the simulator's"
                           f" rank order, {run_pos} in the runtime's")
            live.discard(change.rank)
        else:
            live.add(change.rank)
        mship.apply(ev)
    return out


def cumulative(res: PolicyResult, t: float) -> float:
    """Samples the simulator has committed by time t (segments are piecewise linear;
    whole steps only: a step counts when it ends)."""
    done = 0.0
    for s in res.segments:
        if s.what != "train" or s.t0 >= t:
            continue
        step = GB / s.samples_per_s
        done += int((min(s.t1, t) - s.t0) / step + 1e-6) * GB
    return done


def phase_bounds(applied: list[dict], end: float) -> list[tuple[str, float, float]]:
    """(label, start, end) of each phase between applied events: 'start' up to the first,
    then '-nodeN' / '+nodeN' after each loss / arrival (events at one instant merge).
    `applied`: {'kind', 'node', 'applied_s' (None: never applied)} per event."""
    cuts: list[tuple[float, str]] = []
    for a in sorted((a for a in applied if a["applied_s"] is not None),
                    key=lambda a: a["applied_s"]):
        label = ("-" if a["kind"] == LOSS else "+") + a["node"]
        if cuts and abs(cuts[-1][0] - a["applied_s"]) < 1e-9:
            cuts[-1] = (cuts[-1][0], cuts[-1][1] + " " + label)
        else:
            cuts.append((a["applied_s"], label))
    edges = [(0.0, "start"), *cuts]
    return [(lab, t, edges[i + 1][0] if i + 1 < len(edges) else end)
            for i, (t, lab) in enumerate(edges) if t < end]


def compare(meas: dict, res: PolicyResult) -> dict:
    """Measured timeline (`steps`: (step, seconds) committed, `applied` events) against
    the simulated one: per-phase throughput and error, cumulative samples at every
    measured step (largest gap in steps) and the totals."""
    real = [(t, (i + 1) * GB) for i, (_, t) in enumerate(meas["steps"])]
    errs = [(t, cumulative(res, t + 1e-6), n) for t, n in real]
    gap_steps = max(abs(s - n) / GB for _, s, n in errs)
    out = []
    for name, a, b in phase_bounds(meas["applied"], meas["steps"][-1][1]):
        n_real = sum(GB for _, t in meas["steps"] if a < t <= b)
        n_sim = cumulative(res, b + 1e-6) - cumulative(res, a + 1e-6)
        out.append({"phase": name, "t0": a, "t1": b, "real_samples_per_s": n_real / (b - a),
                    "sim_samples_per_s": n_sim / (b - a),
                    "error": n_sim / n_real - 1 if n_real else None})
    total_real = real[-1][1]
    total_sim = cumulative(res, real[-1][0] + 1e-6)
    return {"phases": out, "largest_gap_steps": gap_steps, "total_real": total_real,
            "total_sim": total_sim, "total_error": total_sim / total_real - 1,
            "points": errs}

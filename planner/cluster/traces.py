"""Failure / availability traces for the cluster simulator.

A trace is a time-sorted list of `TraceEvent`s on *trace nodes* (failure domains). Three
sources:

- the `ms,add|remove,nodeN` CSV used by Bamboo and Oobleck (`parse_trace`, `load_trace`);
  lines may also be `ms,slow,nodeN,FACTOR` (fail-slow: the node computes FACTOR x
  slower; FACTOR 1 ends it), an extension of the format;
- synthetic Poisson failures from an MTBF with repairs (`poisson_trace`);
- synthetic fail-slow stragglers (`straggler_trace`).

Malformed input raises `TraceError` naming the line and what is wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

EVENT_KINDS = ("add", "remove", "slow")
_NODE = re.compile(r"^node(\d+)$")


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the line at fault."""


@dataclass(frozen=True)
class TraceEvent:
    """One change of the cluster."""

    time_s: float
    """Seconds since the trace start."""
    kind: str
    """'add' (node becomes available), 'remove' (node lost) or 'slow' (fail-slow)."""
    node: str
    """Trace node name, e.g. 'node3'."""
    factor: float = 1.0
    """Compute slowdown of a 'slow' event (1.0 = back to normal speed)."""


def parse_trace(text: str, source: str = "<trace>") -> list[TraceEvent]:
    """Parse `ms,add|remove,nodeN` lines (plus `ms,slow,nodeN,FACTOR`); blank lines and
    `#` comments are skipped. Events come back sorted by time (stable)."""
    out: list[TraceEvent] = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{no}: {line!r}"
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (3, 4):
            raise TraceError(f"{where}: expected 'ms,add|remove,nodeN' (or "
                             f"'ms,slow,nodeN,FACTOR'), got {len(parts)} fields")
        ms, kind, node = parts[:3]
        try:
            t = float(ms) / 1e3
        except ValueError:
            raise TraceError(f"{where}: time {ms!r} is not a number of milliseconds") from None
        if t < 0:
            raise TraceError(f"{where}: negative time {ms}")
        if kind not in EVENT_KINDS:
            raise TraceError(f"{where}: unknown event {kind!r}; expected one of {EVENT_KINDS}")
        if not _NODE.match(node):
            raise TraceError(f"{where}: node {node!r} is not of the form nodeN")
        factor = 1.0
        if kind == "slow":
            if len(parts) != 4:
                raise TraceError(f"{where}: a 'slow' event needs a FACTOR field")
            try:
                factor = float(parts[3])
            except ValueError:
                raise TraceError(f"{where}: slowdown {parts[3]!r} is not a number") from None
            if factor < 1.0:
                raise TraceError(f"{where}: slowdown {factor} must be >= 1")
        elif len(parts) == 4:
            raise TraceError(f"{where}: only 'slow' events take a fourth field")
        out.append(TraceEvent(t, kind, node, factor))
    out.sort(key=lambda e: e.time_s)
    return out


def load_trace(path: str | Path) -> list[TraceEvent]:
    """`parse_trace` of a file."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file {p} does not exist (or is not a regular file)")
    return parse_trace(p.read_text(), str(p))


def format_trace(events: list[TraceEvent]) -> str:
    """The CSV text of `events` (round-trips through `parse_trace`)."""
    lines = []
    for e in events:
        ms = f"{e.time_s * 1e3:.0f}"
        lines.append(f"{ms},{e.kind},{e.node}" + (f",{e.factor:g}" if e.kind == "slow" else ""))
    return "\n".join(lines) + "\n"


def initial_nodes(num_nodes: int) -> list[TraceEvent]:
    """`add` events at time 0 for node0..node{n-1}."""
    return [TraceEvent(0.0, "add", f"node{i}") for i in range(num_nodes)]


def poisson_trace(num_nodes: int, duration_s: float, node_mtbf_s: float, repair_s: float,
                  seed: int = 0) -> list[TraceEvent]:
    """Independent exponential failures per node (mean `node_mtbf_s` of up time), each
    node re-added `repair_s` after it fails (replacement / repair). All nodes start up.

    A published rate of one interruption per H hours per G GPUs with g GPUs per node
    gives node_mtbf_s = H * 3600 * G / g.
    """
    if num_nodes < 1 or duration_s <= 0 or node_mtbf_s <= 0 or repair_s < 0:
        raise TraceError(f"poisson_trace: need num_nodes >= 1, duration_s > 0, "
                         f"node_mtbf_s > 0, repair_s >= 0 (got {num_nodes}, {duration_s}, "
                         f"{node_mtbf_s}, {repair_s})")
    rng = random.Random(seed)
    events = initial_nodes(num_nodes)
    for i in range(num_nodes):
        t = rng.expovariate(1.0 / node_mtbf_s)
        while t < duration_s:
            events.append(TraceEvent(t, "remove", f"node{i}"))
            t += repair_s
            if t >= duration_s:
                break
            events.append(TraceEvent(t, "add", f"node{i}"))
            t += rng.expovariate(1.0 / node_mtbf_s)
    events.sort(key=lambda e: e.time_s)
    return events


def straggler_trace(num_nodes: int, duration_s: float, mean_gap_s: float, slow_for_s: float,
                    factor: float, seed: int = 0) -> list[TraceEvent]:
    """Fail-slow episodes: a random node computes `factor` x slower for `slow_for_s`,
    episodes arriving as a Poisson process with mean gap `mean_gap_s`."""
    if factor < 1 or mean_gap_s <= 0 or slow_for_s <= 0:
        raise TraceError("straggler_trace: need factor >= 1, mean_gap_s > 0, slow_for_s > 0")
    rng = random.Random(seed)
    out, t = [], rng.expovariate(1.0 / mean_gap_s)
    while t < duration_s:
        node = f"node{rng.randrange(num_nodes)}"
        out.append(TraceEvent(t, "slow", node, factor))
        if t + slow_for_s < duration_s:
            out.append(TraceEvent(t + slow_for_s, "slow", node, 1.0))
        t += slow_for_s + rng.expovariate(1.0 / mean_gap_s)
    return out


def merge(*traces: list[TraceEvent]) -> list[TraceEvent]:
    """One time-sorted trace from several."""
    return sorted((e for tr in traces for e in tr), key=lambda e: e.time_s)


def mean_gap_s(events: list[TraceEvent]) -> float | None:
    """Mean time between membership changes after t=0 (None when fewer than two)."""
    times = sorted({e.time_s for e in events if e.kind != "slow" and e.time_s > 0})
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)

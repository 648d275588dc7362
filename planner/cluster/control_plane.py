"""What the control plane (the one store server) adds to detect/agree/rebuild at scale.

The simulator's fixed phase costs (TransitionConfig.detect_s, agree_s, rebuild_s) are the
live MTTR phases measured at `REFERENCE_RANKS` ranks (benchmarks/mttr.py). What grows
with the job is the store traffic each phase needs, measured by benchmarks/store_load.py
with up to 1024 simulated ranks against one TCPStore server on loopback:

- detect: the notice fans out to every rank (notify: one wake-up per watcher; poll: every
  rank finds it on its next poll, behind everyone else's polls; node: one wake-up per
  node's relay, the node's ranks then learn it from a local file);
- agree: every survivor registers (set + add) and the decider reads every join record;
- rebuild: every rank publishes and reads its group's rendezvous keys.

Each is a per-rank slope (seconds per rank beyond the reference; the node plane's detect:
per node), multiplied by the server's queueing factor 1 / (1 - utilisation) at the steady
load the design offers (requests/s per rank x ranks + per node x nodes, against the
server's measured capacity), capped where the server saturates. The design's slope and
load are measurements, not guesses: see docs/BENCHMARKS.md ("Control-plane load") for the
table they come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_RANKS = 8
"""Ranks of the MTTR measurement the fixed phase costs come from."""
RANKS_PER_NODE = 8
"""Ranks per node when the caller does not say (benchmarks/store_load.py's default)."""
MAX_QUEUE_FACTOR = 50.0
"""Queueing factor charged at (or past) saturation: the server still answers, slowly."""


@dataclass(frozen=True)
class ControlPlaneModel:
    """Store traffic of one control-plane design (fitted from benchmarks/store_load.py)."""

    name: str
    per_rank_rps: float
    """Steady store requests per second per rank during failure-free training."""
    capacity_rps: float
    """Requests per second the one store server sustains (the knee)."""
    notice_s_per_rank: float
    """Notice -> every rank has seen it, seconds per rank (at low load)."""
    agree_s_per_rank: float
    """Every rank has seen the notice -> every rank has the membership, seconds per rank."""
    rebuild_s_per_rank: float
    """Group rendezvous through the store, seconds per rank."""
    per_node_rps: float = 0.0
    """Steady store requests per second per node (its launcher's: node plane)."""
    notice_s_per_node: float = 0.0
    """Notice -> every rank has seen it, seconds per node (node plane: per relay)."""

    def utilisation(self, ranks: int, ranks_per_node: int = RANKS_PER_NODE) -> float:
        nodes = math.ceil(ranks / ranks_per_node)
        return (self.per_rank_rps * ranks + self.per_node_rps * nodes) / self.capacity_rps

    def queue_factor(self, ranks: int, ranks_per_node: int = RANKS_PER_NODE) -> float:
        rho = self.utilisation(ranks, ranks_per_node)
        return MAX_QUEUE_FACTOR if rho >= 1 else min(MAX_QUEUE_FACTOR, 1.0 / (1.0 - rho))

    def extra_s(self, ranks: int, ranks_per_node: int = RANKS_PER_NODE
                ) -> tuple[float, float, float]:
        """(detect, agree, rebuild) seconds on top of the reference measurement."""
        q = self.queue_factor(ranks, ranks_per_node)
        grow = max(0, ranks - REFERENCE_RANKS) * q
        grow_nodes = max(0, math.ceil(ranks / ranks_per_node)
                         - math.ceil(REFERENCE_RANKS / ranks_per_node)) * q
        return (grow * self.notice_s_per_rank + grow_nodes * self.notice_s_per_node,
                grow * self.agree_s_per_rank, grow * self.rebuild_s_per_rank)


# Fitted from `benchmarks/store_load.py --seconds 3 --engine cpp --knee poll` on the shared
# 2-core development machine (2026-12-01, the compiled generator, 8 ranks per node;
# benchmarks/results/store_load_cpp.json and store_load_knee.json; table in
# docs/BENCHMARKS.md, "Store load at 1024 ranks"). Per-rank rates: the steady req/s over N
# where the generator kept up (poll 121, notify 21.3 per rank; node 10.0 per rank + 4.3
# per node), the same at N = 8, 64, 256 and as both generators measure them. Capacity: the
# most the server answered on this machine, 29k req/s (poll at N = 256, where achieved
# fell below offered); the knee, p50 rising from 0.06 to 2.6 ms, came at 15.6k-19.4k
# req/s, utilisation 0.54-0.67 of it, as a single server's queue predicts. The notice and
# agreement slopes are fitted at N = 1024, where this factor is largest, so that the
# model reproduces those points: notify, publish -> every rank saw it 0.3 -> 75.8 ms and
# seen -> agreed 0.7 -> 103.6 ms at utilisation 0.75 (factor 4.05); node, publish ->
# every rank saw it (through 128 relays) 0.4 -> 103.1 ms and seen -> agreed 0.6 ->
# 102.6 ms at utilisation 0.37 (factor 1.59). The earlier Python-generator fit (8 -> 256
# ranks: 6.6e-5 notice and 1.3e-4 agree per rank for notify, 6.1e-4 per node) charged
# 3-5x what 1024 ranks then cost. Not re-fitted: poll's slopes (at N = 1024 its load was
# past the knee and the generator made 7% of it) and the rebuild slope (two store
# requests per rank of ~20 us each, the loopback round trip; not measured here).
CAPACITY_RPS = 29_000.0
POLL = ControlPlaneModel("poll", per_rank_rps=121.0, capacity_rps=CAPACITY_RPS,
                         notice_s_per_rank=6.0e-5, agree_s_per_rank=1.3e-4,
                         rebuild_s_per_rank=4.0e-5)
NOTIFY = ControlPlaneModel("notify", per_rank_rps=21.3, capacity_rps=CAPACITY_RPS,
                           notice_s_per_rank=1.8e-5, agree_s_per_rank=2.5e-5,
                           rebuild_s_per_rank=4.0e-5)
NODE = ControlPlaneModel("node", per_rank_rps=10.0, capacity_rps=CAPACITY_RPS,
                         notice_s_per_rank=0.0, agree_s_per_rank=6.3e-5,
                         rebuild_s_per_rank=4.0e-5, per_node_rps=4.3,
                         notice_s_per_node=5.1e-4)
MODELS = {"poll": POLL, "notify": NOTIFY, "node": NODE}
"""Designs by monitor.control_plane name; "fixed" (no growth) is handled by the caller."""


def model_for(name: str) -> ControlPlaneModel | None:
    """The model of `name`, or None for "fixed" (phase costs do not grow with ranks)."""
    if name == "fixed":
        return None
    if name not in MODELS:
        raise ValueError(f"control plane must be one of {sorted(MODELS) + ['fixed']}, "
                         f"got {name!r}")
    return MODELS[name]

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


# Fitted from benchmarks/store_load.py with the compiled generator on the shared 2-core
# development machine, 8 ranks per node (docs/BENCHMARKS.md, "Store load at 1024 ranks").
# Capacity: the most the server answered on that machine under load, 29k req/s
# (2026-12-01, poll at N = 256; the knee, p50 0.06 -> 2.6 ms, came at 15.6k-19.4k req/s,
# utilisation 0.54-0.67 of it); on a quieter run (2026-12-02) the knee was at 39k. Kept
# at the loaded figure: a shared store host is the case to plan for. poll: 121 req/s per
# rank and its slopes from the 2026-12-01 runs (at N = 1024 it is past the knee: the
# generator made 7-8% of its load); not re-fitted. notify and node: 2026-12-02,
# `--ranks 8,64,256,1024 --launcher-loop --seconds 3 --knee poll`
# (benchmarks/results/store_load_woken.json), the planes as they are now (decision wait
# woken by the notice, step-boundary reads in the commit decision, each launcher's fence
# watch and ring node watch), launcher traffic counted: per rank 19.0 (notify) and 8.0
# (node) req/s, per node 33.0 and 33.5 (store_load_traffic.offered_per_s at 0.5 s steps;
# the generator made 100% of its schedule at every point). Slopes fitted at N = 1024 so
# the model reproduces those points: notify, publish -> every rank saw it 0.7 -> 161.8 ms
# and seen -> agreed 0.4 -> 83.7 ms at utilisation 0.82 (factor 5.45); node, publish ->
# every rank saw it (through 128 relays) 0.7 -> 157.4 ms and seen -> agreed 0.5 ->
# 43.9 ms at utilisation 0.43 (factor 1.76). Not measured here: the rebuild slope (two
# store requests per rank of ~20 us each, the loopback round trip).
CAPACITY_RPS = 29_000.0
POLL = ControlPlaneModel("poll", per_rank_rps=121.0, capacity_rps=CAPACITY_RPS,
                         notice_s_per_rank=6.0e-5, agree_s_per_rank=1.3e-4,
                         rebuild_s_per_rank=4.0e-5)
NOTIFY = ControlPlaneModel("notify", per_rank_rps=19.0, capacity_rps=CAPACITY_RPS,
                           notice_s_per_rank=2.9e-5, agree_s_per_rank=1.5e-5,
                           rebuild_s_per_rank=4.0e-5, per_node_rps=33.0)
NODE = ControlPlaneModel("node", per_rank_rps=8.0, capacity_rps=CAPACITY_RPS,
                         notice_s_per_rank=0.0, agree_s_per_rank=2.4e-5,
                         rebuild_s_per_rank=4.0e-5, per_node_rps=33.5,
                         notice_s_per_node=7.0e-4)
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

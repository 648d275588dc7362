"""`RecoveryConfig`: how a recovery plan is chosen and carried out (the planner's part
of the job's fault-tolerance section), and the names it accepts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from profiler.units import parse_size

KINDS = ("reroute", "redundant", "reparallelize", "restart", "two-phase")
POLICIES = ("adaptive", *KINDS)
VERIFY = ("moved", "all")


@dataclass(frozen=True)
class RecoveryConfig:
    """How a recovery plan is chosen."""

    policy: str = "adaptive"
    """adaptive (best predicted work over the horizon) or a fixed kind: reroute,
    redundant, reparallelize, restart (falls back to adaptive when infeasible)."""
    horizon_s: float = 600.0
    """Expected time until the next membership change (e.g. MTBF / ranks)."""
    transfer_Bps: float = 500e6
    """Bandwidth of one state transfer between two ranks."""
    rebuild_s: float = 0.05
    """Agreement + group rebuild time common to every in-place kind."""
    checkpoint_load_Bps: float = 200e6
    """Read bandwidth when reloading a checkpoint."""
    device_memory: str = ""
    """Device memory per rank every candidate must fit in, e.g. 16GiB or 80GB (parsed by
    `profiler.units.parse_size`). Empty: on CUDA what the device reports minus
    `memory_reserve`, elsewhere unlimited; "off": unlimited."""
    memory_reserve: str = "1GiB"
    """Kept out of a device-reported capacity (CUDA context, allocator cache,
    fragmentation); not applied to an explicit `device_memory`."""
    memory_aware: bool = True
    """Drop candidates whose predicted peak exceeds the capacity (off: they only carry
    fits=false and may still be chosen, as before memory was checked)."""
    swap_to_fit: bool = True
    """With `memory_aware`: price a candidate over the capacity with swapping its saved
    activations to host memory (`planner.memory.swap_need`, at the copy bandwidth
    Chameleon measures on the leader) and keep it when that fits; the ranks that need it
    run Chameleon at the computed budget while that plan runs."""
    swap_overlap: float = 1.0
    """In that price, the fraction of the copy time Chameleon's timeline hides under
    compute that really hides (`planner.memory.SwapPricing.overlap`)."""
    host_memory: str = "auto"
    """Host memory per rank that swapped activations may fill, e.g. 32GiB; a plan whose
    swapping needs more on some rank is infeasible. "auto": the node's available memory
    when the job starts, over its ranks, less `host_reserve`; "off": unchecked."""
    host_reserve: str = "10%"
    """Kept out of an "auto" host capacity: a size, or a percentage of it."""
    two_phase: bool = True
    """Offer two-phase candidates: reroute now, copy a reparallelized plan's state in
    the background while training goes on, switch to it once the copy is done."""
    background_Bps: float = 0.0
    """Rate limit of a two-phase background copy on each link, bytes/s, so it leaves the
    links to training (0: unlimited, as fast as `transfer_Bps`)."""
    verify: str = "moved"
    """Which layers' replicas a recovery checks bit for bit before training resumes:
    moved (those whose state moved or was reloaded in it; nothing for a reroute) or all
    (every layer: hashing all state costs seconds at GBs per rank). Every layer's
    replicas are checked at the end of training either way."""
    switch_s: float = 0.05
    """A two-phase switch's stall: agreement and group rebuild at a step boundary, with
    no state to move (nothing is aborted)."""

    def __post_init__(self) -> None:
        if self.device_memory not in ("", "off"):
            _size("device_memory", self.device_memory)
        _size("memory_reserve", self.memory_reserve)
        if self.host_memory not in ("auto", "off"):
            _size("host_memory", self.host_memory)
        self._host_reserve(1.0)
        if not 0.0 <= self.swap_overlap <= 1.0:
            raise ValueError(f"swap_overlap must be within [0, 1], got {self.swap_overlap}")
        if self.background_Bps < 0:
            raise ValueError(f"background_Bps must be >= 0 (0: unlimited), "
                             f"got {self.background_Bps}")
        if self.verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {self.verify!r}")
        if self.switch_s < 0:
            raise ValueError(f"switch_s must be >= 0, got {self.switch_s}")

    @property
    def background_link_Bps(self) -> float:
        """Bandwidth a background copy gets on one link (its limit, or the link's)."""
        if self.background_Bps > 0:
            return min(self.background_Bps, self.transfer_Bps)
        return self.transfer_Bps

    def capacity_bytes(self, device_total: float | None = None) -> float:
        """Per-rank capacity candidates are checked against (inf: unchecked);
        `device_total` is what the device reports (the runtime asks it, not the planner)."""
        if self.device_memory == "off":
            return math.inf
        if self.device_memory:
            return float(_size("device_memory", self.device_memory))
        if device_total is None:
            return math.inf
        return max(0.0, device_total - _size("memory_reserve", self.memory_reserve))

    def host_bytes(self, available: float | None, ranks_on_node: int) -> float:
        """Host bytes per rank swapped activations may fill (inf: unchecked);
        `available`: the node's available host memory (the runtime reads it)."""
        if self.host_memory == "off":
            return math.inf
        if self.host_memory != "auto":
            return float(_size("host_memory", self.host_memory))
        if available is None:
            return math.inf
        return max(0.0, available - self._host_reserve(available)) / max(1, ranks_on_node)

    def _host_reserve(self, available: float) -> float:
        text = self.host_reserve.strip()
        if text.endswith("%"):
            try:
                frac = float(text[:-1]) / 100
            except ValueError:
                frac = -1.0
            if not 0 <= frac < 1:
                raise ValueError(f"host_reserve {text!r}: a percentage must be in [0, 100)")
            return frac * available
        return float(_size("host_reserve", text))


def _size(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"{name} {text!r}: {e}") from None

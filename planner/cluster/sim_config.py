"""What the cluster simulator is configured with: transition costs and the simulation
(its length, horizon, step-time predictor, the device memory plans are checked
against, straggler detection and mitigation). Flags of `odyssey simulate` are
generated from these dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cluster.control_plane import model_for
from planner.cluster.policies import MemoryLimits
from planner.memory import SwapPricing
from planner.recovery import RecoveryConfig
from planner.straggler import StragglerConfig
from profiler.configtree import section
from profiler.units import parse_size


@dataclass(frozen=True)
class TransitionConfig:
    """What a change costs. Defaults: the live MTTR phases measured on 8 emulated ranks
    (docs/BENCHMARKS.md, rounded up), torchrun's and torchft's measured stalls there."""

    detect_s: float = 0.1
    """Failure detection (launcher exit record / comm error / heartbeat)."""
    agree_s: float = 0.15
    """Membership agreement among survivors."""
    plan_s: float = 0.15
    """Leader builds and scores the candidates."""
    rebuild_s: float = 0.1
    """Process-group rebuild."""
    transfer_Bps: float = 12.5e9
    """Bandwidth of one state transfer between two GPUs (100 Gb/s effective)."""
    restart_s: float = 30.0
    """torchrun restart of every worker (measured 29.3 s for 8 ranks under load)."""
    heartbeat_timeout_s: float = 5.0
    """torchft: time to notice a dead replica group (measured 5.06 s, defaults)."""
    checkpoint_write_Bps: float = 20e9
    """Aggregate checkpoint write bandwidth (the write blocks training)."""
    checkpoint_load_Bps: float = 20e9
    """Aggregate checkpoint read bandwidth."""
    checkpoint_interval_s: float | None = None
    """Training time between checkpoints; None: Young/Daly sqrt(2 x write x MTBF)."""
    control_plane: str = "notify"
    """How detect/agree/rebuild grow with the job beyond the 8 ranks they were measured
    at: the store traffic of the runtime's control plane ("notify", "node", "poll": fitted from
    benchmarks/store_load.py, planner/cluster/control_plane.py) or "fixed" (no growth)."""

    def __post_init__(self) -> None:
        model_for(self.control_plane)  # raises on an unknown name


@dataclass(frozen=True)
class SimConfig:
    """One simulation: how long, how the leader looks ahead, how step times come."""

    duration_s: float | None = None
    """Simulated wall time; None: until the trace's last event (at least 1 h)."""
    horizon_s: float | None = None
    """Recovery horizon H; None: the trace's mean time between membership changes."""
    predictor: str = "closed-form"
    """'closed-form' (fast, cached per plan) or 'event' (the event simulator)."""
    step_factor: float = 1.0
    """Multiplies every predicted step time (the live runtime's online correction)."""
    timeline: bool = True
    """Keep the per-segment throughput timeline (for plots)."""
    device_memory: str = "off"
    """Device memory per GPU the recovery candidates must fit in, e.g. 40GB or 80GiB
    (`profiler.units.parse_size`); the simulated device reports it and `memory_reserve`
    is kept out, as the live runtime does on CUDA. "off": unchecked (no memory check)."""
    memory_reserve: str = "1GiB"
    """Kept out of `device_memory` (CUDA context, allocator cache, fragmentation)."""
    memory_aware: bool = True
    """With a device memory: drop candidates over it, as the live leader does (off: they
    may be chosen, and the result counts the plans that ran over budget)."""
    swap: bool = False
    """With a device memory and memory awareness: keep candidates that fit only by
    swapping activations to host memory, the swap's exposed time added to their step
    time (`planner.memory.swap_need`; the live leader does not swap yet)."""
    swap_host_Bps: float = SwapPricing.host_Bps
    """Device<->host copy bandwidth of one GPU, for the swap price."""
    swap_overlap: float = SwapPricing.overlap
    """Fraction of the copy time Chameleon's timeline hides under compute that really
    hides (`planner.memory.SwapPricing.overlap`; 0: every copy second exposed)."""
    mitigate_stragglers: bool = True
    """The adaptive policy (Odyssey) finds a trace's slow nodes as the live leader does
    (`planner.straggler.StragglerDetector` on the timings its steps report, thresholds
    from `straggler`) and re-plans around them and back (`planner.mitigation`),
    charging each switch's predicted transition. Off: it keeps its plan through a
    slowdown, as every other policy does (the systems they model never re-plan for one)."""
    straggler: StragglerConfig = section(StragglerConfig, exclude=("enabled", "mitigate"))
    """The detector's window, thresholds and hysteresis, and mitigation's `min_gain`:
    the live runtime's config section (`--straggler.*`)."""

    def __post_init__(self) -> None:
        if self.device_memory != "off":
            try:
                parse_size(self.device_memory)
            except ValueError as e:
                raise ValueError(f"device_memory {self.device_memory!r}: {e}") from None
        RecoveryConfig(memory_reserve=self.memory_reserve)  # raises on a bad size
        if self.swap_host_Bps <= 0 or self.swap_overlap < 0:
            raise ValueError(f"swap_host_Bps must be > 0 and swap_overlap >= 0, got "
                             f"{self.swap_host_Bps} and {self.swap_overlap}")

    def capacity_bytes(self) -> float:
        """Per-GPU capacity (inf: unchecked): the live leader's rule for a device that
        reports `device_memory` (`RecoveryConfig.capacity_bytes`)."""
        if self.device_memory == "off":
            return math.inf
        rc = RecoveryConfig(memory_reserve=self.memory_reserve)
        return rc.capacity_bytes(float(parse_size(self.device_memory)))

    def memory_limits(self) -> MemoryLimits | None:
        """What the recovery policies check candidates against (None: nothing)."""
        cap = self.capacity_bytes()
        if cap == math.inf:
            return None
        swap = SwapPricing(self.swap_host_Bps, self.swap_overlap) if self.swap else None
        return MemoryLimits(cap, self.memory_aware, swap)

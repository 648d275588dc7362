"""What the cluster simulator reports for one policy over one trace."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Segment:
    """A stretch of constant throughput (0 during transitions and checkpoints)."""

    t0: float
    t1: float
    samples_per_s: float
    what: str


@dataclass
class PolicyResult:
    """One policy over one trace."""

    policy: str
    duration_s: float
    samples: float
    """Samples whose step committed and survived (rollbacks subtracted)."""
    steps: int
    transitions: int
    kinds: dict[str, int]
    """Reactions by kind (reroute, reparallelize, restart, drop, heal, ...)."""
    fallbacks: int
    """Changes where the fixed kind was infeasible and the best candidate ran instead."""
    lost_work_s: float
    """Training time thrown away: aborted steps and rollbacks to a checkpoint."""
    stall_s: float
    """Time in transitions."""
    checkpoint_s: float
    """Time writing checkpoints."""
    samples_dropped: float
    """Samples a shrunken batch skipped (drop-replica)."""
    ff_samples_per_s: float
    """Failure-free throughput of the initial plan."""
    post_recovery_ratio: float | None
    """Time-weighted training throughput after the first change over failure-free
    throughput scaled to the live GPUs (1.0 = no gap)."""
    time_to_target_s: float | None
    target_samples: float
    capacity_bytes: float = math.inf
    """Per-GPU device capacity the plans were checked against (inf: unchecked; None in
    `row()`)."""
    peak_bytes: float = 0.0
    """Largest predicted per-GPU peak of any plan run (0: unchecked)."""
    over_budget: int = 0
    """Plans run over the capacity without swapping (they would OOM): the initial plan
    if it is, plus every change after which one ran."""
    over_budget_s: float = 0.0
    """Training time spent on such plans."""
    over_budget_gpu_h: float = 0.0
    """The same in GPU-hours (time x GPUs in the plan: an OOM stops all of them)."""
    memory_dropped: int = 0
    """Changes at which memory dropped a candidate, or none fitted (the kinds then
    chosen are in `kinds`)."""
    memory_fallbacks: int = 0
    """Of `fallbacks`, those where the fixed kind was dropped for memory."""
    swapping: int = 0
    """Changes after which the plan swaps activations to fit."""
    swap_time_s: float = 0.0
    """Training time swapping added (swap_s x steps run)."""
    slowed_s: float = 0.0
    """Training time with a slow rank (a trace `slow` line) in the plan."""
    mitigations: int = 0
    """Switches to a plan around stragglers (adaptive, `SimConfig.mitigate_stragglers`)."""
    drops: int = 0
    """Of `mitigations`, those that dropped the stragglers (they left the job; the
    survivors recovered without them, `--straggler.drop`)."""
    replans_back: int = 0
    """Switches back once the detector cleared every straggler."""
    detection_delay_s: list[float] = field(default_factory=list)
    """Per straggler found: time from the slowdown to the detector reporting it."""
    clear_delay_s: list[float] = field(default_factory=list)
    """Per clearing: time from the speed coming back to the detector clearing it."""
    mitigation_stall_s: float = 0.0
    """Of `stall_s`, the switches around stragglers and back."""
    segments: list[Segment] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.duration_s

    @property
    def goodput(self) -> float:
        return self.samples_per_s / self.ff_samples_per_s

    def row(self) -> dict:
        d = asdict(self)
        d.pop("segments")
        d.pop("events")
        d.update(samples_per_s=self.samples_per_s, goodput=self.goodput)
        if d["capacity_bytes"] == math.inf:  # unchecked; JSON has no infinity
            d["capacity_bytes"] = None
        return d

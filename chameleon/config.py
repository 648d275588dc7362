"""Chameleon's one config dataclass (sizes such as "6GiB" are read by `profiler.units`)."""

from __future__ import annotations

from dataclasses import dataclass

from profiler.units import parse_size


@dataclass
class SwapConfig:
    """Everything Chameleon can be told; defaults suit a GPU with a pinned host arena."""

    budget: int | str = "6GiB"
    """Resident saved-activation bytes allowed on the device (int bytes or "6GiB")."""
    tier: str = "auto"
    """Host tier for swapped tensors: "pinned", "cpu", "disk" or "auto" (pinned on CUDA,
    disk for CPU training)."""
    disk_dir: str | None = None
    """Directory for the disk tier's memory-mapped arena files (default: system temp)."""
    host_arena_bytes: int | str = "256MiB"
    """Initial host arena size; it is pre-sized from the policy and grows if needed."""
    lanes: str = "auto"
    """Copy engine: "cuda" (D2H/H2D streams + events), "thread" (one worker thread per
    direction, for CPU/disk), "sync" (copy inline) or "auto"."""
    min_swap_bytes: int = 64 * 1024
    """Saved tensors smaller than this are always kept (not worth a copy)."""
    prefetch_ahead: int = 1
    """Stages of backward look-ahead for tensors swapped by the reactive rule."""
    prefetch_slack: float = 0.1
    """Fraction of a copy's duration added as safety margin when scheduling prefetch."""
    recompute: bool = True
    """Allow recomputing cheap pointwise activations (GELU/SiLU outputs) instead of moving."""
    layers: list | None = None
    """Modules that define stages; None picks the model's largest nn.ModuleList."""
    detail_every: int = 0
    """Also run a detailed profile every N steps to refresh timings (0 = only on change)."""
    policy_cache: int = 8
    """How many (step signature -> policy) pairs to remember for recurring shapes."""
    oom_retries: int = 2
    """Redo a step this many times after an out-of-memory error (run_step only)."""
    oom_shrink: float = 0.75
    """After an OOM the working budget is multiplied by this before re-planning."""
    calibrate_bytes: int = 8 * 1024 * 1024
    """Size of the start-up copy used to seed the bandwidth estimate (then updated online)."""

    def budget_bytes(self) -> int:
        """The budget in bytes."""
        return parse_size(self.budget)

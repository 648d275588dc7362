"""Chameleon's one config dataclass, and byte-size parsing ("512MiB", "6GiB", ints)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int, a float or a string such as "512MiB", "6GiB", "1.5GB", "4096"."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError(f"size must be >= 0, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r}; use e.g. 512MiB, 6GiB, 1.5GB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(nbytes: float) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


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

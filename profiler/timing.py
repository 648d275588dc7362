"""Robust timing: warm-up, repeats, outlier trimming, median.

Pure Python (no torch): a `sync` callable can be passed to wait for asynchronous devices
(e.g. `torch.cuda.synchronize`) so the measured interval covers the real work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingConfig:
    """How each quantity is timed."""

    warmup: int = 2
    """Untimed runs before measuring (allocator, caches, lazy init)."""
    repeats: int = 5
    """Timed runs; the reported value is the median of those kept after trimming."""
    outlier_mads: float = 3.0
    """Samples further than this many median absolute deviations from the median are
    dropped before taking the median (scheduler hiccups, GC pauses)."""


@dataclass(frozen=True)
class Stat:
    """A robust summary of repeated timings."""

    median: float
    """Median of the kept samples, seconds."""
    spread: float
    """Relative spread of the kept samples: (max - min) / median (0 for one sample)."""
    kept: int
    """Samples kept after outlier trimming."""
    dropped: int
    """Samples dropped as outliers."""


def trim_outliers(samples: Sequence[float], mads: float = 3.0) -> list[float]:
    """Samples within `mads` median absolute deviations of the median (all if MAD is 0)."""
    xs = sorted(float(x) for x in samples)
    if len(xs) < 3:
        return xs
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    if mad == 0:
        return xs
    return [x for x in xs if abs(x - med) <= mads * mad * 1.4826]


def robust_stat(samples: Sequence[float], mads: float = 3.0) -> Stat:
    """Median and spread of `samples` after dropping outliers."""
    if not samples:
        raise ValueError("robust_stat needs at least one sample")
    kept = trim_outliers(samples, mads)
    med = statistics.median(kept)
    spread = (kept[-1] - kept[0]) / med if med > 0 and len(kept) > 1 else 0.0
    return Stat(med, spread, len(kept), len(samples) - len(kept))


def time_call(
    fn: Callable[[], object],
    config: TimingConfig | None = None,
    sync: Callable[[], None] | None = None,
) -> Stat:
    """Time `fn()` robustly: `warmup` untimed calls, then `repeats` timed ones."""
    cfg = config or TimingConfig()
    for _ in range(cfg.warmup):
        fn()
    samples = []
    for _ in range(max(1, cfg.repeats)):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return robust_stat(samples, cfg.outlier_mads)

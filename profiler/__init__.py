"""Profiler: per-layer tables, communication fits and profile files (JSON).

Only torch-free modules are imported here; `profiler.layers` (layer timing) and
`profiler.comm` (gloo micro-benchmarks) import torch and are imported on use.
"""

from profiler.profile import (
    PROFILE_VERSION,
    CommProfile,
    LayerProfile,
    LinkFit,
    Profile,
    ProfileError,
    interpolate,
)
from profiler.synthetic import (
    GPT3_PRESETS,
    FormulaConfig,
    emulated_profile,
    formula_profile,
    loopback_comm,
)
from profiler.timing import Stat, TimingConfig, robust_stat, time_call, trim_outliers

__all__ = [
    "GPT3_PRESETS", "PROFILE_VERSION", "CommProfile", "FormulaConfig", "LayerProfile",
    "LinkFit", "Profile", "ProfileError", "Stat", "TimingConfig", "emulated_profile",
    "formula_profile", "interpolate", "loopback_comm", "robust_stat", "time_call",
    "trim_outliers",
]

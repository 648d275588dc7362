"""Odyssey: a training runtime that keeps jobs running through rank failures.

The public names below load on first use, so torch-free modules of this package
(`odyssey.contract`, `odyssey.faults`, `odyssey.control`) import without the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TrainerHook": "odyssey.hooks", "FitResult": "odyssey.hooks",
    "CheckpointConfig": "odyssey.job_config", "FaultToleranceConfig": "odyssey.job_config",
    "JobConfig": "odyssey.job_config", "MetricsConfig": "odyssey.job_config",
    "ParallelismConfig": "odyssey.job_config", "TrainingConfig": "odyssey.job_config",
    "job_config": "odyssey.job_config",
    "LayeredModel": "odyssey.model", "TensorSpec": "odyssey.model",
    "Trainer": "odyssey.trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'odyssey' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value

"""Odyssey: a training runtime that keeps jobs running through rank failures."""

from odyssey.hooks import TrainerHook
from odyssey.job_config import (
    CheckpointConfig,
    FaultToleranceConfig,
    JobConfig,
    MetricsConfig,
    ParallelismConfig,
    TrainingConfig,
    job_config,
)
from odyssey.model import LayeredModel, TensorSpec
from odyssey.trainer import FitResult, Trainer

__all__ = [
    "CheckpointConfig", "FaultToleranceConfig", "FitResult", "JobConfig", "LayeredModel",
    "MetricsConfig", "ParallelismConfig", "TensorSpec", "Trainer", "TrainerHook",
    "TrainingConfig", "job_config",
]

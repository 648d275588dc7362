"""Odyssey: a training runtime that keeps jobs running through rank failures."""

from odyssey.model import LayeredModel, TensorSpec
from odyssey.trainer import FitResult, TrainConfig, Trainer

__all__ = ["FitResult", "LayeredModel", "TensorSpec", "TrainConfig", "Trainer"]

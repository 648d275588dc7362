"""Mixed precision: autocast compute, fp32 master weights, and fp16's dynamic loss scale.

Parameters, gradients and optimizer state stay fp32; forward runs under autocast in the
compute dtype. Every layer's output is rounded to the compute dtype (the model's last
layer excepted: it feeds the loss), so what crosses a stage boundary is half the bytes
and, because every layer boundary is rounded alike, the numbers do not depend on where
the plan cuts the model. fp16 adds a dynamic loss scale: an overflow anywhere skips the
step on every rank (one commit decision) and halves the scale; `growth_interval` clean
steps in a row double it. The scale is global state replicated in every layer's
optimizer state (`LossScale.state`), so it migrates and checkpoints with any layer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionConfig:
    """Compute dtype and fp16 loss scaling."""

    dtype: str = "fp32"
    """Compute dtype: fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling);
    master weights and optimizer state are fp32 in every case."""
    init_scale: float = 2.0 ** 16
    """fp16: the initial loss scale."""
    growth_interval: int = 2000
    """fp16: clean steps in a row after which the scale doubles."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype must be one of {tuple(DTYPES)}, got "
                             f"{self.dtype!r}")
        if self.init_scale <= 0 or self.growth_interval < 1:
            raise ValueError(f"precision needs init_scale > 0 and growth_interval >= 1, got "
                             f"{self.init_scale} and {self.growth_interval}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mixed(self) -> bool:
        return self.dtype != "fp32"

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.dtype == "fp16"

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The forward's context: autocast in the compute dtype, or nothing (fp32)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def boundary(self, h: torch.Tensor) -> torch.Tensor:
        """A layer's output as it leaves the layer: in the compute dtype."""
        if self.mixed and h.is_floating_point():
            return h.to(self.compute_dtype)
        return h

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a boundary tensor of spec dtype `dtype` travels in."""
        return self.compute_dtype if self.mixed and dtype.is_floating_point else dtype


class LossScale:
    """fp16's dynamic loss scale (1.0 and never changing otherwise)."""

    def __init__(self, cfg: PrecisionConfig):
        self.cfg = cfg
        self.scale = cfg.init_scale if cfg.scaled else 1.0
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        """After a committed step: back off on overflow, grow after enough clean steps."""
        if not self.cfg.scaled:
            return
        if overflow:
            self.scale, self.clean_steps = self.scale * 0.5, 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.cfg.growth_interval:
            self.scale, self.clean_steps = self.scale * 2.0, 0

    @property
    def state(self) -> list[float]:
        return [self.scale, float(self.clean_steps)]

    def load(self, state: list[float]) -> None:
        self.scale, self.clean_steps = float(state[0]), int(state[1])

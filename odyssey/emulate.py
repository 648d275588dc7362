"""Emulated compute: layers that sleep for configured durations on tiny real tensors.

Processes, groups, sends, all-reduces, commits and failures stay real; only the math is
replaced by sleeps, so 8-16 ranks run with realistic timing on a 2-core machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from odyssey.model import LayeredModel, TensorSpec, layer_seed, seeded_init_


@dataclass(frozen=True)
class EmulationConfig:
    """Per-layer timing of the emulated model."""

    num_layers: int = 8
    """Layers in the emulated model."""
    forward_ms: float | tuple[float, ...] = 5.0
    """Forward time per layer per microbatch, ms (one value, or one per layer)."""
    backward_ms: float | tuple[float, ...] = 10.0
    """Backward time per layer per microbatch, ms (one value, or one per layer)."""
    dim: int = 16
    """Width of the tiny real tensors carried between layers."""
    seed: int = 0
    """Weight seed."""

    def per_layer(self, value: float | tuple[float, ...]) -> list[float]:
        if isinstance(value, (int, float)):
            return [float(value)] * self.num_layers
        if len(value) != self.num_layers:
            raise ValueError(f"{len(value)} per-layer times given for {self.num_layers} layers")
        return [float(v) for v in value]


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
        ctx.bwd_s = bwd_s
        _sleep(fwd_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _sleep(ctx.bwd_s)
        return grad, None, None


_boundary = threading.local()


@contextmanager
def layer_check(check: Callable[[], None] | None) -> Iterator[None]:
    """Call `check` at every emulated layer boundary (forward and backward) run by this
    thread inside the block; it raises to abandon the op, as a real engine stops launching
    a stage's kernels at the next layer once the step is known to be aborted."""
    previous = getattr(_boundary, "check", None)
    _boundary.check = check
    try:
        yield
    finally:
        _boundary.check = previous


@contextmanager
def compute_scale(factor: float) -> Iterator[None]:
    """Emulated layers run by this thread inside the block sleep `factor` times their
    configured time (an injected persistent slowdown, odyssey/faults.py)."""
    previous = getattr(_boundary, "scale", 1.0)
    _boundary.scale = factor
    try:
        yield
    finally:
        _boundary.scale = previous


def _sleep(seconds: float) -> None:
    check = getattr(_boundary, "check", None)
    if check is not None:
        check()
    seconds *= getattr(_boundary, "scale", 1.0)
    if seconds > 0:
        time.sleep(seconds)


class EmulatedLayer(nn.Module):
    """A dim x dim linear map whose forward/backward take the configured time."""

    def __init__(self, dim: int, forward_s: float, backward_s: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.forward_s = forward_s
        self.backward_s = backward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(torch.tanh(self.linear(x)), self.forward_s, self.backward_s)


def mse_per_sample(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean(dim=1)


def build_emulated(cfg: EmulationConfig | None = None) -> LayeredModel:
    cfg = cfg or EmulationConfig()
    fwd, bwd = cfg.per_layer(cfg.forward_ms), cfg.per_layer(cfg.backward_ms)

    def build_layer(i: int) -> nn.Module:
        layer = EmulatedLayer(cfg.dim, fwd[i] / 1e3, bwd[i] / 1e3)
        return seeded_init_(layer, layer_seed(cfg.seed, i), std=0.3)

    return LayeredModel(
        name=f"emulated-{cfg.num_layers}",
        num_layers=cfg.num_layers,
        build_layer=build_layer,
        loss_fn=mse_per_sample,
        activation_spec=lambda mb: TensorSpec((mb, cfg.dim)),
    )

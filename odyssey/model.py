"""The model contract: an ordered list of layers plus a loss function.

Layers are addressed by global index and built independently and deterministically, so
any rank can build exactly the layers it holds (and rebuild one it adopts later) with
identical initial weights. Parameters and optimizer state belong to a layer: that is the
unit that checkpoints and migrates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass
class LayeredModel:
    """A model as a list of layers; see the module docstring."""

    name: str
    """Short name for reports (e.g. 'gpt-4x64')."""
    num_layers: int
    """How many layers; indices are 0..num_layers-1."""
    build_layer: Callable[[int], nn.Module]
    """Builds layer i with deterministic initial weights (no global RNG use)."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(last layer output, targets) -> per-sample loss of shape [microbatch]."""
    activation_spec: Callable[[int], TensorSpec]
    """Microbatch size -> spec of the activation passed between any two layers (the
    largest one when they differ: cost estimates use it)."""
    boundary_spec: Callable[[int, int], TensorSpec] | None = None
    """Optional (layer i, microbatch size) -> spec of layer i's input, for models whose
    boundaries differ in shape (e.g. DeepSpeed layer lists); None: activation_spec."""


def seeded_init_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Re-initialise parameters from a private generator (thread-safe, deterministic).

    Norm layers get weight 1 and bias 0; other matrices N(0, std); other vectors 0.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            is_norm = isinstance(m, (nn.LayerNorm, nn.RMSNorm))
            for name, p in m.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                else:
                    p.zero_()
    return module


def layer_seed(model_seed: int, layer: int) -> int:
    return model_seed * 1_000_003 + layer * 7919 + 17

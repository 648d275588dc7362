"""The model contract: an ordered list of layers plus a loss function.

Layers are addressed by global index and built independently and deterministically, so
any rank can build exactly the layers it holds (and rebuild one it adopts later) with
identical initial weights. Parameters and optimizer state belong to a layer: that is the
unit that checkpoints and migrates.

Tied parameters (e.g. input and output embeddings) are declared, never discovered: each
`TiedGroup` names parameters of different layers that are one weight. Every member keeps
its own tensor in its own layer (so each still checkpoints and migrates with its layer);
`build_layer` must give all members equal initial values, and the engine gives them equal
gradients (the sum over all members and replicas), so identical updates keep them equal.
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


@dataclass(frozen=True)
class TiedGroup:
    """Parameters of several layers that are one weight (their gradients are summed)."""

    name: str
    """Short name for messages and the weight-decay rule (e.g. 'embedding')."""
    members: tuple[tuple[int, str], ...]
    """(layer index, parameter name within that layer), e.g. ((0, 'tok.weight'),
    (5, 'lm.weight')); at least two, in distinct layers, all of one shape."""

    @property
    def layers(self) -> tuple[int, ...]:
        """The member layers, ascending."""
        return tuple(sorted(layer for layer, _ in self.members))


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
    tied: tuple[TiedGroup, ...] = ()
    """Tied parameter groups (see the module docstring); empty: nothing is tied."""

    def __post_init__(self) -> None:
        seen: set[tuple[int, str]] = set()
        for g in self.tied:
            layers = [layer for layer, _ in g.members]
            if len(layers) < 2 or len(set(layers)) != len(layers):
                raise ValueError(f"tied group {g.name!r} needs members in >= 2 distinct "
                                 f"layers, got {list(g.members)}")
            if any(not 0 <= layer < self.num_layers for layer in layers):
                raise ValueError(f"tied group {g.name!r} names a layer outside "
                                 f"[0, {self.num_layers}): {list(g.members)}")
            if seen & set(g.members):
                raise ValueError(f"tied group {g.name!r} shares a parameter with another")
            seen |= set(g.members)

    def tied_names(self, layer: int) -> dict[str, str]:
        """Layer `layer`'s tied parameter names -> their group's name."""
        return {p: g.name for g in self.tied for i, p in g.members if i == layer}


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

"""Run a DeepSpeed pipeline model under Odyssey: a `PipelineModule` or a `LayerSpec` list
becomes a `LayeredModel`.

DeepSpeed's pipeline contract is Odyssey's: an ordered list of layers, each feeding the
next, plus `loss_fn(outputs, labels)`. What Odyssey needs on top, and how we get it:

* **Any rank builds any layer with the same weights** (a recovery may move layer i to a
  rank that never held it). Layer i is built with torch's global RNG seeded to
  `base_seed + i` -- exactly what DeepSpeed does with `PipelineModule(seed_layers=True)`,
  so the two frameworks start from identical weights. A layer given as a built
  `nn.Module` is deep-copied. Building holds a lock (ranks may be threads of one
  process) and restores the caller's RNG state afterwards.
* **Boundary shapes** (to size receive buffers): inferred once by a dry forward of an
  example microbatch; dim 0 must be the batch dim, it scales with the microbatch size.
* **Loss per sample**: DeepSpeed's `loss_fn` returns the microbatch mean; Odyssey sums
  per-sample losses and divides by the global batch. The adapter repeats the mean over the
  microbatch, so both frameworks apply the same gradient (mean / number of microbatches).

Not supported, with a clear error: `TiedLayerSpec` (a tied weight lives in two layers,
while Odyssey gives every parameter one owning layer that migrates on its own), layers
that pass tuples between them, and non-float tensors at a layer boundary. `deepspeed` is
imported only to recognise its classes, and only if it is already installed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from odyssey.model import LayeredModel, TensorSpec

_BUILD_LOCK = threading.Lock()
DEFAULT_BASE_SEED = 1234
"""DeepSpeed's `PipelineModule` default `base_seed`."""


class DeepSpeedModelError(ValueError):
    """A DeepSpeed pipeline model that Odyssey cannot run as given."""


class _Call(nn.Module):
    """A parameterless callable from a layer list (DeepSpeed allows plain functions)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _ds_classes() -> tuple[type | None, type | None, type | None]:
    """(PipelineModule, LayerSpec, TiedLayerSpec), or Nones without deepspeed."""
    try:
        from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    except ImportError:
        return None, None, None
    return PipelineModule, LayerSpec, TiedLayerSpec


def _is_spec(obj: Any) -> bool:
    # duck-typed so a spec list can be checked without importing deepspeed's classes
    return hasattr(obj, "typename") and hasattr(obj, "build") and not isinstance(obj, nn.Module)


def _layer_builder(specs: list[Any], base_seed: int, seed_fn: Callable[[int], Any] | None
                   ) -> Callable[[int], nn.Module]:
    _, _, tied_cls = _ds_classes()
    for i, s in enumerate(specs):
        if (tied_cls is not None and isinstance(s, tied_cls)) or hasattr(s, "tied_weight_attr"):
            raise DeepSpeedModelError(
                f"layer {i} is a TiedLayerSpec (key {getattr(s, 'key', '?')!r}): tied weights "
                "are not supported -- Odyssey gives each parameter one owning layer, which "
                "checkpoints and migrates on its own. Untie the weights (separate "
                "parameters) or keep the tied layers in one LayerSpec.")
        if not (_is_spec(s) or isinstance(s, nn.Module) or callable(s)):
            raise DeepSpeedModelError(
                f"layer {i} is a {type(s).__name__}: expected a LayerSpec, an nn.Module or a "
                "callable")
        if isinstance(s, nn.Module) and s.__class__.__name__ == "PipelineModule":
            raise DeepSpeedModelError(f"layer {i} is a nested PipelineModule (DeepSpeed "
                                      "does not support that either)")

    def build_layer(i: int) -> nn.Module:
        if not 0 <= i < len(specs):
            raise IndexError(f"layer {i} outside [0, {len(specs)})")
        s = specs[i]
        if isinstance(s, nn.Module):
            with _BUILD_LOCK:  # other ranks (threads) may copy the same template
                return copy.deepcopy(s)
        if not _is_spec(s):
            return _Call(s)
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            if seed_fn is not None:
                seed_fn(base_seed + i)
            else:
                torch.manual_seed(base_seed + i)
            return s.build()

    return build_layer


def _boundaries(layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable) -> tuple[list[TensorSpec], int]:
    """Specs of the inputs of layers 1..n-1 for the example batch, and its batch size."""
    mb = x.shape[0]
    specs: list[TensorSpec] = []
    h = x
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i > 0:
                if not isinstance(h, torch.Tensor):
                    raise DeepSpeedModelError(
                        f"layer {i - 1} returns a {type(h).__name__}; Odyssey passes exactly "
                        "one tensor between layers (pack tuples into one tensor)")
                if not h.is_floating_point():
                    raise DeepSpeedModelError(
                        f"the input of layer {i} is {h.dtype}: tensors crossing a layer "
                        "boundary must be floating point (they carry gradients)")
                if h.dim() == 0 or h.shape[0] != mb:
                    raise DeepSpeedModelError(
                        f"the input of layer {i} has shape {tuple(h.shape)}: dim 0 must be "
                        f"the microbatch dim ({mb})")
                specs.append(TensorSpec(tuple(h.shape[1:]), h.dtype))
            h = layer(h)
        loss = loss_fn(h, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise DeepSpeedModelError(f"loss_fn must return a scalar (the microbatch mean, as "
                                  f"DeepSpeed expects), got {shape}")
    return specs, mb


def from_deepspeed(layers: Any, example: tuple[torch.Tensor, torch.Tensor],
                   loss_fn: Callable | None = None, name: str | None = None,
                   base_seed: int | None = None) -> LayeredModel:
    """Wrap a DeepSpeed pipeline model as a `LayeredModel`.

    `layers`: a `deepspeed.pipe.PipelineModule` (its full layer list, `loss_fn`,
    `base_seed` and `seed_fn` are used; its own partition is ignored), or a sequence of
    `LayerSpec`s, `nn.Module`s and callables (an `nn.Sequential` works too).
    `example`: one (inputs, labels) microbatch, used for a dry forward that infers the
    boundary shapes and checks the contract. `loss_fn` overrides the module's.
    """
    pipe_cls, _, _ = _ds_classes()
    seed_fn = None
    if pipe_cls is not None and isinstance(layers, pipe_cls):
        specs = list(layers._layer_specs)
        loss_fn = loss_fn or layers.loss_fn
        base_seed = layers.base_seed if base_seed is None else base_seed
        # Odyssey seeds per layer even when seed_layers=False (DeepSpeed's weights then
        # depend on its partition, so the two start from different weights)
        seed_fn = layers.seed_fn
    elif isinstance(layers, (Sequence, nn.Sequential)) and not isinstance(layers, str):
        specs = list(layers)
    else:
        raise DeepSpeedModelError(f"expected a PipelineModule or a list of layers, got "
                                  f"{type(layers).__name__}")
    if not specs:
        raise DeepSpeedModelError("the model has no layers")
    if loss_fn is None:
        raise DeepSpeedModelError("the model needs a loss: PipelineModule(loss_fn=...) or "
                                  "from_deepspeed(..., loss_fn=...)")
    base_seed = DEFAULT_BASE_SEED if base_seed is None else base_seed
    build_layer = _layer_builder(specs, base_seed, seed_fn)
    x, y = example
    bounds, _ = _boundaries([build_layer(i) for i in range(len(specs))], x, y, loss_fn)
    biggest = max(bounds, key=lambda s: torch.Size(s.shape).numel(),
                  default=TensorSpec(tuple(x.shape[1:]), torch.float32))

    def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the microbatch mean, once per sample: its sum / global batch = mean / #microbatches
        return loss_fn(out, target).reshape(1).expand(out.shape[0])

    return LayeredModel(
        name=name or f"ds-pipe-{len(specs)}",
        num_layers=len(specs),
        build_layer=build_layer,
        loss_fn=per_sample_loss,
        activation_spec=lambda mb: TensorSpec((mb, *biggest.shape), biggest.dtype),
        boundary_spec=lambda i, mb: TensorSpec((mb, *bounds[i - 1].shape), bounds[i - 1].dtype),
    )

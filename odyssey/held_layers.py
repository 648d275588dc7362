"""`HeldLayers`: the layers one rank holds, each with its optimizer.

A layer with its optimizer state is the unit that checkpoints and migrates, so this is
the one place that builds, drops, saves, loads, packs and digests them. The engine
executes over it; the coordinator moves state through it; the trainer checkpoints
through it. Nobody else touches the modules or optimizers directly.

Tied parameters (`LayeredModel.tied`) stay in their layers; `tied_members` finds the held
ones. The global loss scale (`odyssey.precision.LossScale`, fp16) travels in every
layer's packed state and checkpoint entry, so any rank that receives any layer has it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from odyssey import checkpoint as ckpt
from odyssey.migrate import layer_digest, pack_layer, packed_size, unpack_layer
from odyssey.model import LayeredModel
from odyssey.optim import set_lr
from odyssey.precision import LossScale, PrecisionConfig

OptimizerFactory = Callable[[nn.Module, dict[str, str]], torch.optim.Optimizer]
"""(layer module, its tied parameter names -> group name) -> the layer's optimizer."""


class HeldLayers:
    """Layer modules and optimizers by global layer index, on one device."""

    def __init__(self, model: LayeredModel, device: torch.device,
                 make_optimizer: OptimizerFactory, loss_scale: LossScale | None = None):
        self.model = model
        self.device = device
        self._make_optimizer = make_optimizer
        self._modules: dict[int, nn.Module] = {}
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        self.loss_scale = loss_scale or LossScale(PrecisionConfig())
        """The job's loss scale (shared with the engine; 1.0 unless fp16)."""
        self._tied = {i: set(model.tied_names(i)) for i in range(model.num_layers)}

    # ---- which layers ----------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """Indices of the held layers, ascending."""
        return sorted(self._modules)

    def __contains__(self, i: int) -> bool:
        return i in self._modules

    def module(self, i: int) -> nn.Module:
        return self._modules[i]

    def optimizer(self, i: int) -> torch.optim.Optimizer:
        return self._optimizers[i]

    def parameters(self, start: int, end: int) -> list[nn.Parameter]:
        """Parameters of layers [start, end), in layer order."""
        return [p for i in range(start, end) for p in self._modules[i].parameters()]

    def untied_parameters(self, start: int, end: int) -> list[nn.Parameter]:
        """Parameters of layers [start, end) that are in no tied group (what the layer
        groups' all-reduce carries), in layer order."""
        return [p for i in range(start, end) for n, p in self._modules[i].named_parameters()
                if n not in self._tied[i]]

    def tied_members(self, group: int) -> list[nn.Parameter]:
        """The held members of tied group `group`, in member order."""
        return [self._modules[i].get_parameter(n) for i, n in self.model.tied[group].members
                if i in self._modules]

    def reset(self, i: int) -> None:
        """(Re)build layer i with its initial weights and a fresh optimizer."""
        self._modules[i] = self.model.build_layer(i).to(self.device)
        self._optimizers[i] = self._make_optimizer(self._modules[i], self.model.tied_names(i))

    def sibling(self) -> HeldLayers:
        """An empty set of layers built like these, with a loss scale of its own (a
        two-phase copy's layers, stepped on another thread until they are adopted)."""
        return HeldLayers(self.model, self.device, self._make_optimizer)

    def adopt(self, other: HeldLayers, i: int) -> None:
        """Take layer i, module and optimizer, from `other` (which no longer holds it)."""
        self._modules[i] = other._modules.pop(i)
        self._optimizers[i] = other._optimizers.pop(i)

    def keep_only(self, layers: Iterable[int]) -> None:
        """Drop every held layer not in `layers`."""
        keep = set(layers)
        for i in [i for i in self._modules if i not in keep]:
            del self._modules[i], self._optimizers[i]

    # ---- training ----------------------------------------------------------------------
    def step(self, start: int, end: int, lr: float | None = None) -> None:
        """Optimizer step of layers [start, end), at learning rate `lr` if given."""
        if lr is not None:
            set_lr((self._optimizers[i] for i in range(start, end)), lr)
        for i in range(start, end):
            self._optimizers[i].step()

    def grad_numel(self, layers: Iterable[int]) -> int:
        """Elements of `flat_grads(layers)`."""
        return sum(p.numel() for i in layers for p in self._modules[i].parameters())

    def flat_grads(self, layers: Iterable[int], head: Sequence[float] = ()) -> torch.Tensor:
        """Every parameter gradient of `layers` (zeros where none), as one fp32 copy,
        after the values of `head` (a message's header: one copy in all)."""
        parts = [torch.tensor(head, dtype=torch.float32, device=self.device)]
        parts += [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                  for i in layers for p in self._modules[i].parameters()]
        return torch.cat(parts)

    def set_flat_grads(self, layers: Iterable[int], flat: torch.Tensor) -> None:
        """The inverse of `flat_grads`: each parameter's gradient from `flat`."""
        offset = 0
        for i in layers:
            for p in self._modules[i].parameters():
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
                offset += n

    def zero_grad(self) -> None:
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self, i: int) -> dict:
        """Layer i's checkpoint entry: its module's and its optimizer's state dicts."""
        return {"model": self._modules[i].state_dict(),
                "optim": self._optimizers[i].state_dict(),
                "loss_scale": self.loss_scale.state}

    def load_state_dict(self, i: int, state: dict) -> None:
        self._modules[i].load_state_dict(state["model"])
        self._optimizers[i].load_state_dict(state["optim"])
        if "loss_scale" in state:
            self.loss_scale.load(state["loss_scale"])

    def load_checkpoint(self, root: str | os.PathLike, step: int | None,
                        layers: Iterable[int]) -> None:
        """Load `layers` from the checkpoint of `step` (None: back to initial weights)."""
        for i in layers:
            if step is None:
                self.reset(i)
            else:
                self.load_state_dict(i, ckpt.load_layer(root, step, i))

    def weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every held layer's module state dict (tests compare replicas with it)."""
        return {i: self._modules[i].state_dict() for i in self.ids}

    # ---- migration ---------------------------------------------------------------------
    def pack(self, i: int, device: torch.device) -> torch.Tensor:
        """Layer i's state as one flat tensor on `device` (the transport's)."""
        return pack_layer(self._modules[i], self._optimizers[i], device,
                          self.loss_scale.state)

    def receive_buffer(self, i: int, device: torch.device) -> torch.Tensor:
        """An empty tensor on `device` that a packed layer i arrives in."""
        return torch.empty(packed_size(self._modules[i]), device=device)

    def unpack(self, i: int, flat: torch.Tensor) -> None:
        scale = unpack_layer(flat, self._modules[i], self._optimizers[i])
        if scale is not None:
            self.loss_scale.load(scale)

    def digests(self, layers: Iterable[int]) -> dict[int, str]:
        """A hash of each of `layers`' parameters (replicas must agree bit for bit)."""
        return {i: layer_digest(self._modules[i]) for i in layers}

"""The wire format of layer state moving between live ranks, and the replica digest.

A layer's state (parameters, AdamW moments and step, and the job's loss scale) travels as
one flat fp32 tensor
over a 2-member group per (src, dst) pair. It is packed where the layer lives and moved
to the transport's device only when the backend needs it there (gloo: host memory), so
on CUDA with NCCL the state never leaves the GPU.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def transport_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor must be for `backend` to send it: gloo gets host tensors, NCCL
    the device's own."""
    return torch.device("cpu") if backend == "gloo" else device


def pack_layer(layer: nn.Module, optim: torch.optim.Optimizer,
               device: torch.device | str = "cpu",
               loss_scale: list[float] = (1.0, 0.0)) -> torch.Tensor:
    """[has_state, step, (scale, clean steps,) params..., exp_avg..., exp_avg_sq...] as one
    fp32 tensor on `device` (the transport's); the loss scale comes with layers that
    have parameters."""
    params = list(layer.parameters())
    states = [optim.state.get(p, {}) for p in params]
    has_state = all("exp_avg" in s for s in states) and bool(states)
    home = params[0].device if params else torch.device(device)
    header = [1.0 if has_state else 0.0, float(states[0]["step"]) if has_state else 0.0]
    if params:
        header += [float(v) for v in loss_scale]
    parts = [torch.tensor(header, device=home)]
    parts += [p.detach().reshape(-1).float() for p in params]
    for name in ("exp_avg", "exp_avg_sq"):
        parts += [(s[name] if has_state else torch.zeros_like(p)).reshape(-1).float()
                  for s, p in zip(states, params)]
    return torch.cat(parts).to(device)


def _header_size(layer: nn.Module) -> int:
    return 4 if any(True for _ in layer.parameters()) else 2


def packed_size(layer: nn.Module) -> int:
    return _header_size(layer) + 3 * sum(p.numel() for p in layer.parameters())


def unpack_layer(flat: torch.Tensor, layer: nn.Module, optim: torch.optim.Optimizer
                 ) -> list[float] | None:
    """Load a packed state into `layer` and `optim` (wherever `flat` arrived); return the
    loss scale state it carried (None for a layer without parameters)."""
    params = list(layer.parameters())
    has_state, step = bool(flat[0].item()), float(flat[1].item())
    offset = _header_size(layer)
    scale = flat[2:4].tolist() if offset == 4 else None
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        moments = {}
        for name in ("exp_avg", "exp_avg_sq"):
            moments[name] = []
            for p in params:
                moments[name].append(flat[offset:offset + p.numel()].view_as(p).clone())
                offset += p.numel()
    optim.state.clear()
    if has_state:
        for i, p in enumerate(params):
            optim.state[p] = {"step": torch.tensor(step),
                              "exp_avg": moments["exp_avg"][i].to(p.device),
                              "exp_avg_sq": moments["exp_avg_sq"][i].to(p.device)}
    return scale


def layer_digest(layer: nn.Module) -> str:
    """A hash of the layer's parameter bytes (any dtype; hashed in place, no copy on
    CPU: sha256, which CPUs accelerate, is ~2x faster here than sha1 of a copy)."""
    h = hashlib.sha256()
    for p in layer.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

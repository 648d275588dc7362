"""Moving layer state between live ranks, and checking replicas agree afterwards.

A layer's state (parameters and AdamW moments and step) travels as one flat fp32 tensor
over a 2-member group per (src, dst) pair. Senders post every send first (asynchronous),
then receivers receive in one global order, so no transfer waits on another.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from odyssey.comm import Comm, Pending


def pack_layer(layer: nn.Module, optim: torch.optim.Optimizer) -> torch.Tensor:
    """[has_state, step, params..., exp_avg..., exp_avg_sq...] as one fp32 tensor."""
    params = list(layer.parameters())
    states = [optim.state.get(p, {}) for p in params]
    has_state = all("exp_avg" in s for s in states) and bool(states)
    parts = [torch.tensor([1.0 if has_state else 0.0]),
             torch.tensor([float(states[0]["step"]) if has_state else 0.0])]
    parts += [p.detach().reshape(-1).float() for p in params]
    for name in ("exp_avg", "exp_avg_sq"):
        parts += [(s[name] if has_state else torch.zeros_like(p)).reshape(-1).float()
                  for s, p in zip(states, params)]
    return torch.cat([t.cpu() for t in parts])


def packed_size(layer: nn.Module) -> int:
    return 2 + 3 * sum(p.numel() for p in layer.parameters())


def unpack_layer(flat: torch.Tensor, layer: nn.Module, optim: torch.optim.Optimizer) -> None:
    params = list(layer.parameters())
    has_state, step = bool(flat[0].item()), float(flat[1].item())
    offset = 2
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


def send_layers(comm: Comm, outgoing: list[tuple[int, int, torch.Tensor]]) -> list[Pending]:
    """Post sends of packed layers: (layer, dst, flat) each."""
    return [comm.send(flat, dst, "mig") for _, dst, flat in outgoing]


def layer_digest(layer: nn.Module) -> str:
    h = hashlib.sha1()
    for p in layer.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

"""Single-process reference training over the same sample ids (the ground truth).

Same per-layer optimizers, same loss scaling (sum of per-sample losses / global batch),
microbatches accumulated in id order: any plan must reproduce these losses.
"""

from __future__ import annotations

import torch

from odyssey.data import Sampler
from odyssey.engine import OptimizerConfig, make_optimizer
from odyssey.model import LayeredModel


def reference_run(model: LayeredModel, data, sampler: Sampler, steps: int,
                  optim: OptimizerConfig | None = None, start_step: int = 0,
                  layers: list[torch.nn.Module] | None = None
                  ) -> tuple[list[float], list[torch.nn.Module]]:
    """Train `steps` steps in one process; return (per-step losses, layers)."""
    optim = optim or OptimizerConfig()
    layers = layers or [model.build_layer(i) for i in range(model.num_layers)]
    opts = [make_optimizer(layer, optim) for layer in layers]
    losses = []
    for step in range(start_step, start_step + steps):
        total = 0.0
        for mb in range(sampler.num_microbatches):
            x, y = data.batch(sampler.sample_ids(step, mb))
            h = x
            for layer in layers:
                h = layer(h)
            loss = model.loss_fn(h, y).sum()
            total += float(loss.detach())
            (loss / sampler.global_batch).backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(total / sampler.global_batch)
    return losses, layers

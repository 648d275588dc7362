"""Single-process reference training over the same sample ids (the ground truth).

The same recipe as the engine, written out plainly: per-layer optimizers with the same
weight-decay groups, the same loss scaling (sum of per-sample losses / global batch,
times the fp16 loss scale), microbatches accumulated in id order, autocast with every
layer's output rounded to the compute dtype, tied groups' gradients summed over their
members, one global gradient norm (each tied group counted once) for clipping, the lr of
each step from the step index. Any plan must reproduce these losses.
"""

from __future__ import annotations

import torch

from odyssey.data import Sampler
from odyssey.model import LayeredModel
from odyssey.optim import (
    OptimizerConfig,
    all_finite,
    clip_coefficient,
    lr_at,
    make_optimizer,
    set_lr,
    sum_of_squares,
)
from odyssey.precision import LossScale, PrecisionConfig


def reference_run(model: LayeredModel, data, sampler: Sampler, steps: int,
                  optim: OptimizerConfig | None = None, start_step: int = 0,
                  layers: list[torch.nn.Module] | None = None,
                  precision: PrecisionConfig | None = None, total_steps: int | None = None,
                  record: dict[str, list] | None = None
                  ) -> tuple[list[float], list[torch.nn.Module]]:
    """Train `steps` steps in one process; return (per-step losses, layers).

    `total_steps`: the job's training.steps (where a decay schedule without decay_steps
    ends; default start_step + steps). `record`, if given, gets per-step lists "lr",
    "grad_norm" (None when neither clipping nor fp16 is on) and "skipped"."""
    optim = (optim or OptimizerConfig()).resolved(total_steps or start_step + steps)
    precision = precision or PrecisionConfig()
    scale = LossScale(precision)
    layers = layers or [model.build_layer(i) for i in range(model.num_layers)]
    opts = [make_optimizer(layer, optim, model.tied_names(i)) for i, layer in enumerate(layers)]
    tied = [[layers[i].get_parameter(n) for i, n in g.members] for g in model.tied]
    tied_ids = {id(p) for members in tied for p in members}
    last = model.num_layers - 1
    losses = []
    for step in range(start_step, start_step + steps):
        total = 0.0
        for mb in range(sampler.num_microbatches):
            x, y = data.batch(sampler.sample_ids(step, mb))
            h = x
            with precision.autocast(torch.device("cpu")):
                for i, layer in enumerate(layers):
                    h = layer(h)
                    if i < last:
                        h = precision.boundary(h)
                per_sample = model.loss_fn(h, y)
            loss = per_sample.sum()
            total += float(loss.detach())
            loss = loss / sampler.global_batch
            (loss * scale.scale if precision.scaled else loss).backward()
        for members in tied:  # one weight: every member gets the sum of their gradients
            grad = torch.stack([p.grad.reshape(-1) for p in members]).sum(0)
            for p in members:
                p.grad = grad.view_as(p).clone()
        grads = [p.grad for layer in layers for p in layer.parameters() if p.grad is not None]
        if precision.scaled:
            for g in grads:
                g.div_(scale.scale)
        overflow = precision.scaled and not all_finite(grads)
        norm = None
        if (optim.grad_clip > 0 or precision.scaled) and not overflow:
            counted = [p.grad for layer in layers for p in layer.parameters()
                       if p.grad is not None and id(p) not in tied_ids]
            counted += [members[0].grad for members in tied]
            norm = sum_of_squares(counted) ** 0.5
            coef = clip_coefficient(norm, optim.grad_clip)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        lr = lr_at(optim, step)
        if not overflow:
            set_lr(opts, lr)
            for o in opts:
                o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        scale.update(overflow)
        losses.append(total / sampler.global_batch)
        if record is not None:
            for key, value in (("lr", lr), ("grad_norm", norm), ("skipped", overflow)):
                record.setdefault(key, []).append(value)
    return losses, layers

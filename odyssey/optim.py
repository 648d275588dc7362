"""The optimizer recipe: AdamW per layer with weight-decay groups, and the LR schedule.

A layer's optimizer is the unit that checkpoints and migrates (`odyssey.held_layers`), so
everything here is decided per layer from names alone: every rank, the single-process
reference and a rank that adopts the layer later build the same parameter groups. The
learning rate is a pure function of the step index (`lr_at`), set right before each
optimizer step; nothing counts steps inside the optimizer, so step k gets the same lr
under any plan and after any recovery or resume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimizerConfig:
    """Per-layer AdamW settings, weight-decay groups, LR schedule and gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the decayed group."""
    no_decay: str = ""
    """Regex searched in a parameter's name within its layer (e.g. `ln|bias|tok`) and in a
    tied group's name: matching parameters get no weight decay. Empty: the default rule,
    no decay on norm and embedding weights, biases and every other 1-D parameter, and on
    tied parameters (tied input/output embeddings)."""
    schedule: str = "constant"
    """LR schedule by step: constant, cosine or linear (warmup, then decay to the floor)."""
    warmup_steps: int = 0
    """Linear warmup steps: step k < warmup_steps gets lr * (k + 1) / warmup_steps."""
    decay_steps: int = 0
    """Steps of cosine/linear decay after warmup (0: until training.steps)."""
    min_lr_ratio: float = 0.0
    """The floor the decay ends at, as a fraction of lr."""
    grad_clip: float = 0.0
    """Clip gradients to this global L2 norm over the whole model (0: off)."""

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"optimizer needs lr >= 0, eps > 0, weight_decay >= 0; got "
                             f"lr={self.lr} eps={self.eps} weight_decay={self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two values in [0, 1), got {self.betas}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got "
                             f"{self.schedule!r}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(f"optimizer.warmup_steps and decay_steps must be >= 0, got "
                             f"{self.warmup_steps} and {self.decay_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got "
                             f"{self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"optimizer.grad_clip must be >= 0, got {self.grad_clip}")
        try:
            re.compile(self.no_decay)
        except re.error as e:
            raise ValueError(f"optimizer.no_decay is not a regex: {e}") from None

    def resolved(self, total_steps: int) -> OptimizerConfig:
        """This config with `decay_steps` 0 replaced by the steps left after warmup."""
        if self.decay_steps or self.schedule == "constant":
            return self
        return replace(self, decay_steps=max(1, total_steps - self.warmup_steps))


def lr_at(cfg: OptimizerConfig, step: int) -> float:
    """The learning rate of step `step` (a pure function of the step index)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_steps))
    shape = (0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine"
             else 1.0 - progress)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


def decays(module: nn.Module, name: str, cfg: OptimizerConfig,
           tied: dict[str, str] | None = None) -> bool:
    """Whether parameter `name` of a layer `module` gets weight decay.

    `tied`: this layer's tied parameter names -> their group's name. A tied group's
    decision uses only names, so every member (on any rank) decides the same way."""
    if tied and name in tied:
        return bool(cfg.no_decay) and not (re.search(cfg.no_decay, name)
                                           or re.search(cfg.no_decay, tied[name]))
    if cfg.no_decay:
        return re.search(cfg.no_decay, name) is None
    owner_name, _, _ = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.GroupNorm,
                          nn.BatchNorm1d)):
        return False
    return module.get_parameter(name).dim() >= 2


class NoParamsOptimizer:
    """The optimizer of a layer without parameters (an activation, a reshape): a no-op
    with an empty state, so such layers checkpoint and migrate like any other."""

    def __init__(self) -> None:
        self.state: dict = {}
        self.param_groups: list[dict] = []

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_optimizer(layer: nn.Module, cfg: OptimizerConfig,
                   tied: dict[str, str] | None = None
                   ) -> torch.optim.Optimizer | NoParamsOptimizer:
    """AdamW over `layer` with a decayed and an undecayed group (empty ones left out)."""
    named = list(layer.named_parameters())
    if not named:
        return NoParamsOptimizer()
    decay = [p for n, p in named if decays(layer, n, cfg, tied)]
    plain = [p for n, p in named if not decays(layer, n, cfg, tied)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def sum_of_squares(grads: list[torch.Tensor]) -> float:
    """Sum of squared entries, accumulated in float64, with one device sync (the engine
    and the reference both use it)."""
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return float(norms.square().sum())


def all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether no gradient holds an inf or nan (one device sync)."""
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor clipping to `max_norm` multiplies gradients by (1.0: no clipping; the
    epsilon is torch.nn.utils.clip_grad_norm_'s)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def set_lr(optimizers: Iterable, lr: float) -> None:
    """Give every parameter group of `optimizers` the learning rate `lr`."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr

"""A small GPT built in code as a `LayeredModel`: embedding, N blocks, norm + head.

No downloads: weights come from seeded generators, data from `odyssey.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from odyssey.model import LayeredModel, TensorSpec, layer_seed, seeded_init_


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the example GPT."""

    vocab_size: int = 64
    """Token vocabulary (must match the data)."""
    seq_len: int = 32
    """Context length."""
    d_model: int = 64
    """Hidden width."""
    n_heads: int = 4
    """Attention heads (d_model must divide evenly)."""
    n_blocks: int = 4
    """Transformer blocks; the model has n_blocks + 2 layers."""
    mlp_ratio: int = 4
    """MLP hidden width = mlp_ratio * d_model."""
    seed: int = 0
    """Weight seed."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.tok(tokens) + self.pos(pos)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        # No biases (as in LLaMA-style GPTs): a key bias has an exactly-zero gradient,
        # and Adam turns the rounding noise of that zero into full-size updates.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.lm = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.ln(x))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy, shape [batch]."""
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none")
    return ce.view(b, t).mean(dim=1)


def build_gpt(cfg: GPTConfig | None = None) -> LayeredModel:
    cfg = cfg or GPTConfig()
    n = cfg.n_blocks + 2

    def build_layer(i: int) -> nn.Module:
        if not 0 <= i < n:
            raise IndexError(f"layer {i} outside [0, {n})")
        layer = Embedding(cfg) if i == 0 else Head(cfg) if i == n - 1 else Block(cfg)
        return seeded_init_(layer, layer_seed(cfg.seed, i))

    return LayeredModel(
        name=f"gpt-{cfg.n_blocks}x{cfg.d_model}",
        num_layers=n,
        build_layer=build_layer,
        loss_fn=token_loss,
        activation_spec=lambda mb: TensorSpec((mb, cfg.seq_len, cfg.d_model)),
    )

"""Small real models used by Chameleon's tests and benchmarks (no downloads).

* `TinyGPT`: decoder-only transformer (explicit causal attention, GELU MLP).
* `VarLenGPT`: the same blocks over a *packed* batch of sequences of different lengths
  (per-sequence attention), so the saved-tensor sequence changes with the batch.
* `TinyMoE`: transformer whose MLP is a mixture of experts with top-2 routing
  (boolean-index dispatch, index_add combine): routing changes saved shapes each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyConfig:
    """Sizes of the reference models."""

    vocab: int = 128
    """Vocabulary size."""
    d_model: int = 64
    """Hidden width."""
    n_heads: int = 4
    """Attention heads."""
    n_layers: int = 3
    """Blocks."""
    max_len: int = 256
    """Longest sequence (position table)."""
    n_experts: int = 4
    """Experts per MoE layer (TinyMoE)."""
    seed: int = 0
    """Weight seed."""


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return att.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Block(nn.Module):
    """Pre-norm transformer block; `moe` swaps the MLP for a top-2 mixture of experts."""

    def __init__(self, cfg: TinyConfig, moe: bool = False) -> None:
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = MoE(cfg) if moe else nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                                      nn.Linear(4 * d, d))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        return self.proj(_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(x)
        return x + self.mlp(self.ln2(x))


class MoE(nn.Module):
    """Top-2 routed experts (GELU MLPs)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.router = nn.Linear(d, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.router(x).softmax(-1).topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = idx == e
            rows = sel.any(-1)
            if not bool(rows.any()):
                continue  # this expert got no tokens this step
            pos = rows.nonzero().squeeze(1)
            gate = (w * sel).sum(-1)[rows].unsqueeze(1)
            out = out.index_add(0, pos, expert(x[rows]) * gate)
        return out.view(shape)


class TinyGPT(nn.Module):
    """Token + position embedding, `n_layers` blocks in a ModuleList, norm, LM head."""

    def __init__(self, cfg: TinyConfig | None = None, moe: bool = False) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TinyConfig()
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(cfg.seed)
            self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, moe) for _ in range(cfg.n_layers))
            self.ln = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[-1], device=tokens.device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TinyMoE(TinyGPT):
    """TinyGPT with top-2 mixture-of-experts MLPs."""

    def __init__(self, cfg: TinyConfig | None = None) -> None:
        super().__init__(cfg, moe=True)


class VarLenBlock(Block):
    """Block over a packed batch [total_tokens, d]: attention per sequence."""

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # type: ignore[override]
        parts = [self.attend(s.unsqueeze(0)).squeeze(0) for s in x.split(lengths)]
        x = x + torch.cat(parts)
        return x + self.mlp(self.ln2(x))


class VarLenGPT(TinyGPT):
    """TinyGPT over packed variable-length sequences: forward(tokens[N], lengths)."""

    def __init__(self, cfg: TinyConfig | None = None) -> None:
        super().__init__(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)
            self.blocks = nn.ModuleList(VarLenBlock(self.cfg) for _ in range(self.cfg.n_layers))

    def forward(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # type: ignore[override]
        pos = torch.cat([torch.arange(n, device=tokens.device) for n in lengths])
        x = self.tok(tokens) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, lengths)
        return self.head(self.ln(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
             lengths: list[int]) -> torch.Tensor:
        return F.cross_entropy(self(tokens, lengths), targets)


def batch(cfg: TinyConfig, b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random (tokens, targets) of shape [b, t]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab, (b, t + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def varlen_batch(cfg: TinyConfig, lengths: list[int], seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (tokens, targets) for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab, (sum(lengths) + 1,), generator=g)
    return x[:-1].contiguous(), x[1:].contiguous()

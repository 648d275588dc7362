"""The three kinds of layer a Hugging Face causal LM becomes, and their seeded init.

Each wraps submodules taken from the model's meta skeleton, so their parameter names
are Hugging Face's below a short prefix (`odyssey.hf.adapter.hf_key` maps them back).
A block layer computes its own position ids, causal mask and rotary cos/sin from the
sequence length: nothing but the hidden states crosses a stage boundary.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


class HFEmbedding(nn.Module):
    """Token embedding (+ learned position embedding, GPT-2 style)."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding | None):
        super().__init__()
        self.tokens = tokens
        self.positions = positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return h


class HFBlock(nn.Module):
    """One decoder block; position ids, mask and rotary embedding made here, per stage."""

    def __init__(self, block: nn.Module, config, rotary: nn.Module | None, sliding: bool):
        super().__init__()
        self.block = block
        self.rotary = rotary  # parameterless: its buffers are not part of the state dict
        self.config = config
        self._mask = create_sliding_window_causal_mask if sliding else create_causal_mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        # the same mask function the HF model calls (None under sdpa: is_causal)
        mask = self._mask(config=self.config, inputs_embeds=h, attention_mask=None,
                          cache=None, position_ids=pos)
        kwargs = {"attention_mask": mask}
        if self.rotary is not None:
            kwargs.update(position_ids=pos, position_embeddings=self.rotary(h, pos))
        out = self.block(h, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class HFHead(nn.Module):
    """Final norm + LM head: hidden states -> logits."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def seeded_hf_init_(layer: nn.Module, seed: int, std: float,
                    scaled: tuple[str, ...] = (), scaled_std: float | None = None) -> nn.Module:
    """Hugging Face's init scheme from a private generator (deterministic, thread-safe).

    Matrices and embeddings N(0, std) (`scaled` name suffixes: N(0, scaled_std), GPT-2's
    residual projections), norms weight 1 / bias 0, other vectors 0, padding rows 0.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, m in layer.named_modules():
            norm = _is_norm(m)
            for name, p in m.named_parameters(recurse=False):
                full = f"{mod_name}.{name}" if mod_name else name
                if norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() >= 2:
                    s = scaled_std if scaled_std is not None and full.endswith(scaled) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
                else:
                    p.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
    return layer


def shared_matrix(seed: int, shape: torch.Size, std: float) -> torch.Tensor:
    """The tied word-embedding matrix: its own generator, so the embedding layer and the
    head draw bit-identical initial values wherever each is built."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * std


def gpt2_scaled_std(std: float, num_blocks: int) -> float:
    """GPT-2's residual-projection init: std / sqrt(2 * blocks)."""
    return std / math.sqrt(2 * num_blocks)

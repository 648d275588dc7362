"""KV-cache inference for the example GPT (`examples/gpt.py`), token-batched.

Uses the very layers `build_gpt` builds (same weights, same parameter layout) but its own
inference path, so the training forward/backward is untouched. One iteration runs a
mixed batch: the tokens of every prompt being prefilled and one token per decoding
request are concatenated into a [tokens, d_model] matrix for the dense ops (embedding,
norms, QKV, projection, MLP); attention runs per request, causal over its prompt for a
prefill and over its KV cache for a decode; the head runs on each request's last row.

The iteration is split into component functions (`dense_pre`, `dense_post`,
`attend_prefill`, `attend_decode`, `head`) that `profiler/serving.py` times one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from examples.gpt import GPTConfig, build_gpt


@dataclass(frozen=True)
class ServeModelConfig:
    """The served GPT: larger than the training example so iterations take milliseconds."""

    vocab_size: int = 256
    """Token vocabulary."""
    context: int = 512
    """Largest position (prompt + output - 1 must stay below it)."""
    d_model: int = 256
    """Hidden width."""
    n_heads: int = 8
    """Attention heads."""
    n_blocks: int = 4
    """Transformer blocks."""
    seed: int = 0
    """Weight seed."""

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, seq_len=self.context,
                         d_model=self.d_model, n_heads=self.n_heads,
                         n_blocks=self.n_blocks, seed=self.seed)


class KVCacheGPT:
    """The example GPT's layers with a per-request KV cache; see the module docstring."""

    def __init__(self, cfg: ServeModelConfig | None = None, max_slots: int = 32):
        self.cfg = cfg or ServeModelConfig()
        self.model = build_gpt(self.cfg.gpt())
        layers = [self.model.build_layer(i).eval() for i in range(self.model.num_layers)]
        self.layers = layers
        self.emb, self.blocks, self.head_layer = layers[0], layers[1:-1], layers[-1]
        self.h = self.cfg.n_heads
        self.hd = self.cfg.d_model // self.h
        # The KV cache is one pool allocated (and touched) up front, as vLLM does: a
        # per-request allocation would page-fault fresh memory on every prefill.
        self.pool = torch.zeros(max_slots, len(self.blocks), 2, self.h, self.cfg.context,
                                self.hd)
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.caches: dict[int, torch.Tensor] = {}
        """rid -> its pool slot [n_blocks, 2 (k, v), heads, context, head_dim]."""
        self._slot: dict[int, int] = {}

    # ---- memory ---------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token slot takes (all blocks, K and V)."""
        return self.cfg.n_blocks * 2 * self.cfg.d_model * 4

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.layers for p in m.parameters())

    def allocate(self, rid: int, capacity: int) -> None:
        """Give request `rid` a cache slot for `capacity` positions."""
        if capacity > self.cfg.context:
            raise ValueError(f"request {rid}: {capacity} positions exceed the context "
                             f"{self.cfg.context}")
        if rid in self.caches:
            raise ValueError(f"request {rid} already holds a cache slot")
        if not self.free_slots:
            raise ValueError(f"KV pool exhausted ({self.pool.shape[0]} slots)")
        self._slot[rid] = self.free_slots.pop()
        self.caches[rid] = self.pool[self._slot[rid]]

    def free(self, rid: int) -> None:
        if rid in self.caches:
            del self.caches[rid]
            self.free_slots.append(self._slot.pop(rid))

    # ---- components (timed separately by the serving profiler) ----------------------
    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.emb.tok(tokens) + self.emb.pos(positions)

    def dense_pre(self, b: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[b]
        return blk.qkv(blk.ln1(x))

    def dense_post(self, b: int, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[b]
        x = x + blk.proj(att)
        return x + blk.out(F.gelu(blk.fc(blk.ln2(x))))

    def attend_prefill(self, b: int, rid: int, qkv: torch.Tensor) -> torch.Tensor:
        """Causal attention over a whole prompt; fills cache slots [0, p)."""
        p, d = qkv.shape[0], self.cfg.d_model
        q, k, v = (z.view(p, self.h, self.hd).transpose(0, 1) for z in qkv.split(d, dim=1))
        cache = self.caches[rid][b]
        cache[0, :, :p] = k
        cache[1, :, :p] = v
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           is_causal=True)
        return o[0].transpose(0, 1).reshape(p, d)

    def attend_decode(self, b: int, rid: int, qkv: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One new token (row of qkv) attending to kv_len cached slots, its own included."""
        d = self.cfg.d_model
        q, k, v = (z.view(self.h, 1, self.hd) for z in qkv.split(d))
        cache = self.caches[rid][b]
        cache[0, :, kv_len - 1] = k[:, 0]
        cache[1, :, kv_len - 1] = v[:, 0]
        o = F.scaled_dot_product_attention(q.unsqueeze(0), cache[0, :, :kv_len].unsqueeze(0),
                                           cache[1, :, :kv_len].unsqueeze(0))
        return o.reshape(d)

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        """Greedy next token of each row."""
        return self.head_layer(rows).argmax(dim=-1)

    # ---- one iteration -------------------------------------------------------------
    @torch.no_grad()
    def step(self, prefills: list[tuple[int, torch.Tensor]],
             decodes: list[tuple[int, int, int]]) -> torch.Tensor:
        """Run one mixed iteration; return the next token of each request, in order.

        prefills: (rid, prompt tokens [p]); the cache of rid must be allocated.
        decodes: (rid, last token, kv_len) where kv_len counts the new token.
        """
        tok = [t for _, t in prefills]
        pos = [torch.arange(t.numel()) for t in tok]
        if decodes:
            tok.append(torch.tensor([t for _, t, _ in decodes]))
            pos.append(torch.tensor([k - 1 for _, _, k in decodes]))
        x = self.embed(torch.cat(tok), torch.cat(pos))
        lens = [t.numel() for _, t in prefills]
        for b in range(len(self.blocks)):
            qkv = self.dense_pre(b, x)
            parts, off = [], 0
            for (rid, _), p in zip(prefills, lens):
                parts.append(self.attend_prefill(b, rid, qkv[off:off + p]))
                off += p
            for i, (rid, _, kv) in enumerate(decodes):
                parts.append(self.attend_decode(b, rid, qkv[off + i], kv).unsqueeze(0))
            x = self.dense_post(b, x, torch.cat(parts) if len(parts) > 1 else parts[0])
        ends, off = [], 0
        for p in lens:
            off += p
            ends.append(off - 1)
        last = torch.tensor(ends + list(range(off, off + len(decodes))), dtype=torch.long)
        return self.head(x[last])

    @torch.no_grad()
    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reference: the training forward (no cache) over [1, t] tokens -> [t, vocab]."""
        x = tokens.view(1, -1)
        for layer in self.layers:
            x = layer(x)
        return x[0]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int) -> list[int]:
        """Greedy decode of n tokens with the cache (one request; for tests)."""
        rid = -1
        self.allocate(rid, prompt.numel() + n)
        try:
            out = [int(self.step([(rid, prompt)], [])[0])]
            for i in range(1, n):
                out.append(int(self.step([], [(rid, out[-1], prompt.numel() + i)])[0]))
            return out
        finally:
            self.free(rid)

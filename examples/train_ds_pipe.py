"""Train a DeepSpeed pipeline model (a `LayerSpec` list) with Odyssey, unchanged.

    odyssey run --standalone --nproc-per-node 2 examples/train_ds_pipe.py --pp 2 \\
        --ds-config examples/ds_config.json --steps 40

The model is written the DeepSpeed way -- `LayerSpec`s plus a `loss_fn(outputs, labels)`
returning the microbatch mean -- and would run as is under DeepSpeed's own engine with
`PipelineModule(layers=pipe_layers(cfg), loss_fn=lm_loss, num_stages=P, seed_layers=True,
base_seed=cfg.seed)` (tests/odyssey/test_deepspeed_model.py does exactly that and compares the
losses). The batch sizes and AdamW settings come from the DeepSpeed JSON config.
Needs deepspeed installed (for `LayerSpec`); nothing of DeepSpeed runs at training time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from examples.gpt import Block, GPTConfig  # noqa: E402
from odyssey.data import ArithmeticTokens  # noqa: E402
from odyssey.deepspeed_model import from_deepspeed  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.job_config import SHORT_FLAGS, JobConfig  # noqa: E402
from odyssey.model import LayeredModel  # noqa: E402
from odyssey.trainer import Trainer, fit_and_exit  # noqa: E402
from profiler.configtree import ConfigParser, section  # noqa: E402


@dataclass(frozen=True)
class PipeConfig:
    """Sizes of the example DeepSpeed pipeline model."""

    vocab_size: int = 64
    """Token vocabulary (must match the data)."""
    seq_len: int = 32
    """Context length."""
    d_model: int = 64
    """Hidden width; the head works at 2 x d_model."""
    n_heads: int = 4
    """Attention heads."""
    n_blocks: int = 2
    """Transformer blocks; the model has n_blocks + 5 layers."""
    seed: int = 1234
    """base_seed: layer i is built with torch seeded to seed + i (seed_layers=True)."""


class TokenEmbedding(nn.Module):
    """Token + learned position embedding (int64 tokens in, floats out)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


def pipe_layers(cfg: PipeConfig) -> list:
    """The model as DeepSpeed `LayerSpec`s: embedding, blocks, then a head that widens to
    2 x d_model (so layer boundaries have different shapes)."""
    from deepspeed.pipe import LayerSpec

    gpt = GPTConfig(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, d_model=cfg.d_model,
                    n_heads=cfg.n_heads, n_blocks=cfg.n_blocks)
    wide = 2 * cfg.d_model
    return [
        LayerSpec(TokenEmbedding, cfg.vocab_size, cfg.seq_len, cfg.d_model),
        *[LayerSpec(Block, gpt) for _ in range(cfg.n_blocks)],
        LayerSpec(nn.Linear, cfg.d_model, wide),
        LayerSpec(nn.GELU),
        LayerSpec(nn.LayerNorm, wide),
        LayerSpec(nn.Linear, wide, cfg.vocab_size),
    ]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-style loss: the mean token cross-entropy of the microbatch (a scalar)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def build(cfg: PipeConfig) -> tuple[LayeredModel, ArithmeticTokens]:
    data = ArithmeticTokens(cfg.vocab_size, cfg.seq_len)
    model = from_deepspeed(pipe_layers(cfg), example=data.batch([0, 1]), loss_fn=lm_loss,
                           base_seed=cfg.seed, name=f"ds-pipe-{cfg.n_blocks}x{cfg.d_model}")
    return model, data


@dataclass(frozen=True)
class TrainPipeConfig(JobConfig):
    """The job, and the DeepSpeed pipeline model it trains."""

    pipe: PipeConfig = section(PipeConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = ConfigParser(
        TrainPipeConfig, aliases={**SHORT_FLAGS, "pipe-*": "pipe"},
        description="Train a DeepSpeed pipeline model (LayerSpec list + DeepSpeed JSON "
                    "config) with Odyssey; start it with `odyssey run` or `torchrun`."
    ).parse_config(argv)
    torch.set_num_threads(1)
    model, data = build(cfg.pipe)
    worker = worker_from_env()
    fit_and_exit(lambda: Trainer(model, data, cfg, worker))


if __name__ == "__main__":
    main()

"""Pretrain a Llama-style model (Hugging Face `LlamaForCausalLM`, built from a config) on a
token file: warmup + cosine, clipping, bf16, validation every N steps, checkpoints.

    odyssey prepare-data --stdlib --max-mb 8 --out data/stdlib.bin   # `make setup` does it
    odyssey run --standalone --nproc-per-node 4 examples/pretrain_llama.py \\
        --data data/stdlib.bin --dp 2 --pp 2 --inject kill:rank=3,step=40,phase=backward

Every flag comes from the config tree (`--optimizer.*`, `--precision.*`, `--data.*`,
`--eval.*`, `--llama.*`, ...; see --help); the recipe's defaults are set below.
`--model gpt` trains the example GPT instead (no `transformers` needed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig  # noqa: E402  (the optional `hf` extra)

from examples.gpt import GPTConfig, build_gpt  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.hf import from_hf_config, write_hf_config  # noqa: E402
from odyssey.hooks import CommittedStep, TrainerHook  # noqa: E402
from odyssey.job_config import SHORT_FLAGS, DataConfig, EvalConfig, JobConfig  # noqa: E402
from odyssey.optim import OptimizerConfig  # noqa: E402
from odyssey.precision import PrecisionConfig  # noqa: E402
from odyssey.trainer import Trainer, fit_and_exit  # noqa: E402
from profiler.configtree import ConfigParser, section  # noqa: E402


@dataclass(frozen=True)
class LlamaSize:
    """The Llama-style model's sizes (a `transformers.LlamaConfig`; vocab from the data)."""

    hidden: int = 128
    """Hidden width."""
    blocks: int = 4
    """Decoder blocks (the model has blocks + 2 layers: embedding, blocks, norm + head)."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    ffn: int = 344
    """MLP hidden width."""
    tie_embeddings: bool = False
    """Tie the input embedding and the output head (summed across first and last stage)."""


@dataclass(frozen=True)
class PretrainConfig(JobConfig):
    """The job with the recipe's defaults, and the model it trains."""

    model: str = "llama"
    """llama (Hugging Face LlamaForCausalLM) or gpt (the example GPT)."""
    seq_len: int = 128
    """Tokens per sample (windows of seq_len + 1 from the token file)."""
    llama: LlamaSize = section(LlamaSize)
    gpt: GPTConfig = section(GPTConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig, default=OptimizerConfig(
        lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1,
        grad_clip=1.0))
    precision: PrecisionConfig = section(PrecisionConfig, default=PrecisionConfig("bf16"))
    data: DataConfig = section(DataConfig, default=DataConfig(path="data/stdlib.bin"))
    eval: EvalConfig = section(EvalConfig, default=EvalConfig(every=20, microbatches=8))


class TokensSeen(TrainerHook):
    """A user callback: log the tokens trained so far beside the loss (and lr, grad norm)."""

    def __init__(self, cfg: PretrainConfig):
        self.per_step = cfg.training.num_microbatches * cfg.training.microbatch_size * cfg.seq_len

    def on_step_end(self, step: CommittedStep) -> None:
        step.log_scalar("tokens_seen", (step.step + 1) * self.per_step)


def build_model(cfg: PretrainConfig, vocab_size: int):
    if cfg.model == "gpt":
        return build_gpt(replace(cfg.gpt, vocab_size=vocab_size, seq_len=cfg.seq_len))
    m = cfg.llama
    return from_hf_config(LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden, num_hidden_layers=m.blocks,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, intermediate_size=m.ffn,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=m.tie_embeddings),
        cfg.seq_len)


def main(argv: list[str] | None = None) -> None:
    aliases = {**SHORT_FLAGS, "llama-*": "llama", "gpt-*": "gpt"}
    cfg = ConfigParser(PretrainConfig, aliases=aliases, description=__doc__.splitlines()[0]
                       ).parse_config(argv)
    data = cfg.data.open(cfg.seq_len)
    model = build_model(cfg, data.vocab_size or 256)

    def trainer() -> Trainer:
        t = Trainer(model, data.train, cfg, worker_from_env(), hooks=[TokensSeen(cfg)],
                    eval_data=data.val)
        if cfg.model == "llama":  # what `odyssey export RUN_DIR` reads
            write_hf_config(t.run_dir, model)
        return t

    fit_and_exit(trainer)


if __name__ == "__main__":
    main()

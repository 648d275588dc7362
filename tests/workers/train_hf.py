"""Train a tiny Hugging Face causal LM (built from a config in code) under `odyssey run`.

Used by tests/odyssey/test_hf_*.py; `tiny_hf_model(TinyHF(...))` is the same model for
the single-process reference. Rank 0 records the HF config in the run directory, so
`odyssey export RUN_DIR` can write a from_pretrained directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, Qwen2Config  # noqa: E402

from odyssey.data import ArithmeticTokens  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.hf import HFLayeredModel, from_hf_config, write_hf_config  # noqa: E402
from odyssey.job_config import SHORT_FLAGS, JobConfig  # noqa: E402
from odyssey.trainer import Trainer, fit_and_exit  # noqa: E402
from profiler.configtree import ConfigParser, section  # noqa: E402


@dataclass(frozen=True)
class TinyHF:
    """A tiny config of one HF family."""

    family: str = "llama"
    """llama, qwen2 or gpt2."""
    vocab_size: int = 64
    """Vocabulary (the data's too)."""
    hidden: int = 32
    """Hidden width."""
    blocks: int = 2
    """Decoder blocks (the model has blocks + 2 layers)."""
    heads: int = 4
    """Attention heads (llama/qwen2: 2 key-value heads)."""
    seq_len: int = 16
    """Sequence length."""
    tied: bool = True
    """tie_word_embeddings."""
    seed: int = 0
    """Weight seed."""


def hf_config(t: TinyHF) -> PretrainedConfig:
    if t.family == "gpt2":
        return GPT2Config(vocab_size=t.vocab_size, n_embd=t.hidden, n_layer=t.blocks,
                          n_head=t.heads, n_positions=t.seq_len, tie_word_embeddings=t.tied,
                          bos_token_id=0, eos_token_id=0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[t.family]
    return cls(vocab_size=t.vocab_size, hidden_size=t.hidden, intermediate_size=2 * t.hidden,
               num_hidden_layers=t.blocks, num_attention_heads=t.heads, num_key_value_heads=2,
               max_position_embeddings=t.seq_len, tie_word_embeddings=t.tied)


def tiny_hf_model(t: TinyHF) -> tuple[HFLayeredModel, ArithmeticTokens]:
    return (from_hf_config(hf_config(t), seq_len=t.seq_len, seed=t.seed),
            ArithmeticTokens(t.vocab_size, t.seq_len))


@dataclass(frozen=True)
class TrainHFConfig(JobConfig):
    hf: TinyHF = section(TinyHF)


def main(argv: list[str] | None = None) -> None:
    cfg = ConfigParser(TrainHFConfig, aliases={**SHORT_FLAGS, "hf-*": "hf"}).parse_config(argv)
    torch.set_num_threads(1)
    model, data = tiny_hf_model(cfg.hf)
    worker = worker_from_env()

    def make() -> Trainer:
        trainer = Trainer(model, data, cfg, worker)
        if worker.rank == 0:
            write_hf_config(trainer.run_dir, model)
        return trainer

    fit_and_exit(make)


if __name__ == "__main__":
    main()

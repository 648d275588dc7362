"""The smallest complete pretraining script: a Hugging Face Llama on a token file with
warmup + cosine, weight decay, clipping, bf16, validation and checkpoints.

    odyssey run --standalone --nproc-per-node 4 examples/pretrain_minimal.py \\
        --data data/stdlib.bin --dp 2 --pp 2 --inject kill:rank=3,step=20,phase=backward

Every setting is a flag (`--help`); the recipe's defaults are the lines below.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from odyssey.env import worker_from_env
from odyssey.hf import from_hf_config, write_hf_config
from odyssey.job_config import SHORT_FLAGS, CheckpointConfig, DataConfig, EvalConfig, JobConfig
from odyssey.optim import OptimizerConfig
from odyssey.precision import PrecisionConfig
from odyssey.trainer import Trainer, fit_and_exit
from profiler.configtree import ConfigParser, section

SEQ_LEN = 128


@dataclass(frozen=True)
class Recipe(JobConfig):
    optimizer: OptimizerConfig = section(OptimizerConfig, default=OptimizerConfig(
        lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1,
        grad_clip=1.0))
    precision: PrecisionConfig = section(PrecisionConfig, default=PrecisionConfig("bf16"))
    data: DataConfig = section(DataConfig, default=DataConfig(path="data/stdlib.bin"))
    eval: EvalConfig = section(EvalConfig, default=EvalConfig(every=20, microbatches=8))
    checkpoint: CheckpointConfig = section(CheckpointConfig, default=CheckpointConfig(every=50))


def main() -> None:
    cfg = ConfigParser(Recipe, aliases=SHORT_FLAGS).parse_config()
    data = cfg.data.open(SEQ_LEN)  # training windows and a held-out validation split
    model = from_hf_config(LlamaConfig(
        vocab_size=data.vocab_size or 256, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=344,
        max_position_embeddings=SEQ_LEN), SEQ_LEN)

    def trainer() -> Trainer:
        t = Trainer(model, data.train, cfg, worker_from_env(), eval_data=data.val)
        write_hf_config(t.run_dir, model)  # for `odyssey export RUN_DIR`
        return t

    fit_and_exit(trainer)


if __name__ == "__main__":
    main()

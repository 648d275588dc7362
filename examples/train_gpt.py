"""Train the example GPT (or the emulated model) with Odyssey.

    odyssey run --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --pp 2
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --pp 2
    odyssey run ... examples/train_gpt.py --config job.toml --training.steps 100

Every option comes from the job's config tree (`odyssey.job_config.JobConfig`, plus the
two models' configs here): `--training.steps`, `--parallelism.dp`, `--gpt.d-model`, ...,
with the short aliases `--steps`, `--dp`, `--gpt-d-model`, ... (see --help). The run is
described here, in code, not by a growing flag list.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt import GPTConfig, build_gpt  # noqa: E402
from odyssey.data import ArithmeticTokens, RandomRegression  # noqa: E402
from odyssey.emulate import EmulationConfig, build_emulated  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.hooks import TrainerHook  # noqa: E402
from odyssey.job_config import SHORT_FLAGS, JobConfig  # noqa: E402
from odyssey.trainer import Trainer, fit_and_exit  # noqa: E402
from profiler.configtree import ConfigParser, section  # noqa: E402
from profiler.synthetic import emulated_profile  # noqa: E402


@dataclass(frozen=True)
class TrainGPTConfig(JobConfig):
    """The job, and the model it trains: the GPT (real mode) or sleeping layers (emulated)."""

    gpt: GPTConfig = section(GPTConfig)
    emu: EmulationConfig = section(EmulationConfig)


ALIASES = {**SHORT_FLAGS, "gpt-*": "gpt", "emu-*": "emu"}
"""The job's short flags, and --gpt-FIELD / --emu-FIELD for the model sections."""


def make_parser() -> ConfigParser:
    return ConfigParser(
        TrainGPTConfig, aliases=ALIASES,
        description="Train the example GPT with Odyssey (start it with `odyssey run` or "
                    "`torchrun`). --training.mode emulated swaps the GPT for sleeping "
                    "layers.")


JOB_CONFIG_PARSER = make_parser
"""`odyssey run` checks this script's arguments with it before starting any worker
(launch/preflight.py): keep this module free of side effects at import."""


def parse_args(argv: list[str] | None = None) -> TrainGPTConfig:
    return make_parser().parse_config(argv)


def main(argv: list[str] | None = None, hooks: Sequence[TrainerHook] = ()) -> None:
    """Train as `argv` says; `hooks` (e.g. a benchmark's timers) go to the Trainer."""
    cfg = parse_args(argv)
    torch.set_num_threads(1)
    profile = None
    if cfg.training.mode == "emulated":
        model, data = build_emulated(cfg.emu), RandomRegression(dim=cfg.emu.dim)
        profile = emulated_profile(cfg.emu)  # the cost model knows the configured times
    else:
        model, data = build_gpt(cfg.gpt), ArithmeticTokens(cfg.gpt.vocab_size, cfg.gpt.seq_len)
    worker = worker_from_env()
    fit_and_exit(lambda: Trainer(model, data, cfg, worker, profile=profile, hooks=hooks))


if __name__ == "__main__":
    main()

"""Train the example GPT (or the emulated model) with Odyssey.

    odyssey run --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --pp 2
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --pp 2

Every option comes from a config dataclass (see --help); the run is described here, in
code, not by a growing flag list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt import GPTConfig, build_gpt  # noqa: E402
from odyssey.config import add_dataclass_args, from_args  # noqa: E402
from odyssey.data import ArithmeticTokens, RandomRegression  # noqa: E402
from odyssey.emulate import EmulationConfig, build_emulated  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.trainer import TrainConfig, Trainer, fit_and_exit  # noqa: E402
from profiler.synthetic import emulated_profile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the example GPT with Odyssey (start it with `odyssey run` or "
                    "`torchrun`). --mode emulated swaps the GPT for sleeping layers.")
    add_dataclass_args(p, TrainConfig, "training")
    add_dataclass_args(p, GPTConfig, "model (real mode)", prefix="gpt")
    add_dataclass_args(p, EmulationConfig, "model (emulated mode)", prefix="emu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = from_args(TrainConfig, args)
    profile = None
    if cfg.mode == "emulated":
        emu = from_args(EmulationConfig, args, prefix="emu")
        model, data = build_emulated(emu), RandomRegression(dim=emu.dim)
        profile = emulated_profile(emu)  # the cost model knows the configured times
    elif cfg.mode == "real":
        gpt = from_args(GPTConfig, args, prefix="gpt")
        model, data = build_gpt(gpt), ArithmeticTokens(gpt.vocab_size, gpt.seq_len)
    else:
        sys.exit(f"--mode must be 'real' or 'emulated', got {cfg.mode!r}")
    worker = worker_from_env()
    fit_and_exit(lambda: Trainer(model, data, cfg, worker, profile=profile))


if __name__ == "__main__":
    main()

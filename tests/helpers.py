"""Shared fixtures for engine tests: a tiny GPT and a threads-mode runner."""

from __future__ import annotations

import torch

from examples.gpt import GPTConfig, build_gpt
from odyssey.data import ArithmeticTokens, Sampler
from odyssey.local import run_threads
from odyssey.reference import reference_run
from odyssey.trainer import TrainConfig, Trainer

TINY = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=2)


def tiny_model():
    return build_gpt(TINY), ArithmeticTokens(TINY.vocab_size, TINY.seq_len)


def run_plan(cfg: TrainConfig, world: int, timeout_s: float = 120.0):
    """Train with ranks as threads; return (leader FitResult, {layer: state_dict})."""
    model, data = tiny_model()

    def worker(w):
        t = Trainer(model, data, cfg, w)
        return t.fit(), {i: t.engine.layers[i].state_dict() for i in t.engine.held_layers}

    results = run_threads(world, worker, timeout_s)
    states: dict[int, list[dict]] = {}
    for _, st in results:
        for i, sd in st.items():
            states.setdefault(i, []).append(sd)
    return results[0][0], states


def reference(cfg: TrainConfig, steps: int | None = None):
    model, data = tiny_model()
    return reference_run(model, data, Sampler(cfg.num_microbatches, cfg.microbatch_size),
                         steps or cfg.steps)


def max_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def assert_close_state(sd: dict, ref: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sd.keys() == ref.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


# The DeepSpeed JSON config both DeepSpeed test files use: global batch 8 = 4 microbatches of 2.
DS_CONFIG = {
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.0, "torch_adam": True}},
    "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9, "wall_clock_breakdown": False,
}

"""Shared fixtures for tests: a tiny GPT, a threads-mode runner, and `odyssey run` jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from examples.gpt import GPTConfig, build_gpt
from odyssey.data import ArithmeticTokens, Sampler
from odyssey.job_config import JobConfig
from odyssey.testing.reference import reference_run
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.conftest import ROOT

TINY = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=2)


def tiny_model():
    return build_gpt(TINY), ArithmeticTokens(TINY.vocab_size, TINY.seq_len)


def run_plan(cfg: JobConfig, world: int, timeout_s: float = 120.0):
    """Train with ranks as threads; return (leader FitResult, {layer: state_dict})."""
    model, data = tiny_model()

    def worker(w):
        t = Trainer(model, data, cfg, w)
        return t.fit(), t.engine.held.weights()

    results = run_threads(world, worker, timeout_s)
    states: dict[int, list[dict]] = {}
    for _, st in results:
        for i, sd in st.items():
            states.setdefault(i, []).append(sd)
    return results[0][0], states


def reference(cfg: JobConfig, steps: int | None = None):
    t = cfg.training
    model, data = tiny_model()
    return reference_run(model, data, Sampler(t.num_microbatches, t.microbatch_size),
                         steps or t.steps, cfg.optimizer, precision=cfg.precision,
                         total_steps=t.steps)


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


WORKER_ENV = {"OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
"""Added to the environment of every job the tests launch."""


def odyssey_run_cmd(nproc: int, run_dir, script: str, script_args: list[str],
                    launcher_args: Sequence[str] = ()) -> list[str]:
    """`odyssey run --standalone` of examples/SCRIPT on NPROC local workers."""
    return [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node",
            str(nproc), "--run-dir", str(run_dir), *launcher_args,
            str(ROOT / "examples" / script), *script_args]


def run_odyssey(nproc: int, run_dir, script: str, script_args: list[str],
                launcher_args: Sequence[str] = (), timeout: float = 170
                ) -> subprocess.CompletedProcess:
    """Run a job to the end; it must exit 0 (else its output's tail is the message)."""
    proc = subprocess.run(odyssey_run_cmd(nproc, run_dir, script, script_args, launcher_args),
                          cwd=ROOT, env={**os.environ, **WORKER_ENV}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@contextmanager
def odyssey_in_background(nproc: int, run_dir, script: str, script_args: list[str]
                          ) -> Iterator[subprocess.Popen]:
    """A job left running while the test acts on it; killed if still alive on the way out."""
    job = subprocess.Popen(odyssey_run_cmd(nproc, run_dir, script, script_args), cwd=ROOT,
                           env={**os.environ, **WORKER_ENV}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

"""Evaluation and user callbacks: validation loss logged (metrics sinks and report), the
training trajectory bit-for-bit the same with evaluation on and off, custom scalars in
metrics.jsonl, and an evaluation that a SIGKILL interrupts is redone under the new plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from examples.gpt import GPTConfig, build_gpt
from odyssey.hooks import CommittedStep, EvalResult, TrainerHook
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.helpers import run_odyssey

SEQ = 16
MODEL = GPTConfig(vocab_size=256, seq_len=SEQ, d_model=32, n_heads=2, n_blocks=2)


class Callbacks(TrainerHook):
    def __init__(self) -> None:
        self.evals: list[EvalResult] = []
        self.ends: list[int] = []

    def on_step_end(self, step: CommittedStep) -> None:
        self.ends.append(step.step)
        step.log_scalar("twice_step", 2.0 * step.step)

    def on_eval(self, result: EvalResult) -> None:
        self.evals.append(result)
        result.log_scalar("val_ppl", float(torch.tensor(result.loss).exp()))


def _train(run_dir, corpus, eval_every: int):
    cfg = job_config(steps=6, dp=2, pp=2, num_microbatches=4, microbatch_size=2,
                     run_dir=str(run_dir), log_every=100, progress="off", lr=1e-2)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=str(corpus)),
        eval=dataclasses.replace(cfg.eval, every=eval_every, microbatches=3))
    data = cfg.data.open(SEQ)
    model = build_gpt(MODEL)
    hooks: dict[int, Callbacks] = {}

    def worker(w):
        hooks[w.rank] = Callbacks()
        t = Trainer(model, data.train, cfg, w, hooks=[hooks[w.rank]], eval_data=data.val)
        return t.fit(), t.engine.held.weights()

    return run_threads(4, worker, 150), hooks


@pytest.mark.timeout(200)
def test_eval_is_logged_and_leaves_the_trajectory_alone(corpus, tmp_path):
    (on, hooks), (off, _) = (_train(tmp_path / "on", corpus, 2),
                             _train(tmp_path / "off", corpus, 0))
    fit_on, fit_off = on[0][0], off[0][0]
    assert fit_on.losses == fit_off.losses  # bit-for-bit: eval touches no training state
    for (_, w_on), (_, w_off) in zip(on, off):
        for i in w_on:
            for k in w_on[i]:
                assert torch.equal(w_on[i][k], w_off[i][k])
    # every 2nd step and the last: 1, 3, 5; every rank saw the same loss
    assert sorted(fit_on.val_losses) == [1, 3, 5] and not fit_off.val_losses
    assert len(hooks) == 4
    for h in hooks.values():
        assert [e.step for e in h.evals] == [1, 3, 5] and h.ends == list(range(6))
        assert {e.step: e.loss for e in h.evals} == fit_on.val_losses
        assert all(e.samples == 3 * 2 for e in h.evals)
    records = read_jsonl(tmp_path / "on" / "eval.jsonl")
    assert [r["step"] for r in records] == [1, 3, 5]
    assert [r["val_loss"] for r in records] == [fit_on.val_losses[k] for k in (1, 3, 5)]
    assert all(r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item())
               for r in records)
    metrics = read_jsonl(tmp_path / "on" / "metrics.jsonl")
    assert [m["twice_step"] for m in metrics] == [2.0 * k for k in range(6)]
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["eval"]["final_val_loss"] == fit_on.val_losses[5]
    assert fit_on.val_losses[5] < fit_on.val_losses[1]  # it learns the held-out text too


def test_log_scalar_refuses_built_in_names():
    step = CommittedStep(0, 0, None, [0], 0, None, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="built-in"):
        step.log_scalar("loss", 1.0)
    step.log_scalar("tokens", 3)
    assert step.scalars == {"tokens": 3.0}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_failure_during_eval_aborts_it_and_it_is_redone(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--model", "gpt", "--data", str(corpus), "--steps", "8", "--dp", "2", "--pp", "2",
            "--num-microbatches", "4", "--microbatch-size", "2", "--seq-len", str(SEQ),
            "--gpt-d-model", "32", "--gpt-n-heads", "2", "--gpt-n-blocks", "2",
            "--eval-every", "4", "--eval-microbatches", "4", "--log-every", "100",
            "--inject", "kill:rank=2,step=3,phase=eval"]
    proc = run_odyssey(4, run_dir, "pretrain_llama.py", args, ["--finish-grace", "20"], 220)
    report = json.loads((run_dir / "report.json").read_text())
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 7], proc.stdout[-3000:]
    assert evals[0]["gen"] == 1  # redone by the new generation
    recoveries = [e for e in report["events"] if e["kind"] == "recovery"]
    assert [e["ranks_lost"] for e in recoveries] == [[2]]
    assert recoveries[0]["resume_step"] == 4  # step 3 had committed: nothing redone
    s = report["samples"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and report["replicas_identical"] is True

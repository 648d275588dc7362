"""Trainer hooks: what a benchmark or tool sees of a run, without patching anything
(ranks as threads)."""

from __future__ import annotations

import pytest

from odyssey.hooks import CommittedStep, FitResult, TrainerHook, overrides_on_op
from odyssey.job_config import job_config
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.helpers import tiny_model


class Recorder(TrainerHook):
    def __init__(self) -> None:
        self.ops: list = []
        self.steps: list[CommittedStep] = []
        self.ended: FitResult | None = None

    def on_op(self, op) -> None:
        self.ops.append(op)

    def on_step_committed(self, step: CommittedStep) -> None:
        self.steps.append(step)

    def on_fit_end(self, result: FitResult) -> None:
        self.ended = result


class StepsOnly(TrainerHook):  # no on_op: the engine gets no op hook for it
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_committed(self, step: CommittedStep) -> None:
        self.steps.append(step.step)


@pytest.mark.timeout(120)
def test_hooks_see_every_instruction_and_committed_step(tmp_path):
    cfg = job_config(steps=3, dp=1, pp=2, num_microbatches=2, microbatch_size=2,
                     run_dir=str(tmp_path), log_every=100, progress="off")
    model, data = tiny_model()
    hooks: dict[int, tuple[Recorder, StepsOnly]] = {}

    def worker(w):
        hooks[w.rank] = (Recorder(), StepsOnly())
        trainer = Trainer(model, data, cfg, w, hooks=hooks[w.rank])
        return trainer.fit(), [len(trainer.engine.program.for_rank(w.rank))]

    assert overrides_on_op(Recorder()) and not overrides_on_op(StepsOnly())
    results = run_threads(2, worker, timeout_s=100)
    leader_fit = results[0][0]
    for rank, (rec, steps_only) in hooks.items():
        per_step = results[rank][1][0]
        assert [s.step for s in rec.steps] == steps_only.steps == [0, 1, 2]
        assert all(s.leader == (rank == 0) and s.rank == rank for s in rec.steps)
        assert len(rec.ops) == 3 * per_step  # every instruction of every step
        for s in rec.steps:
            ops = [o for o in rec.ops if o.step == s.step]
            assert all(o.start_s <= o.end_s and o.thread_cpu_s >= 0 for o in ops)
            for kind, seconds in s.result.op_seconds.items():
                mine = sum(o.end_s - o.start_s for o in ops if o.instruction.op.value == kind)
                assert mine == pytest.approx(seconds, rel=1e-9, abs=1e-12)
            assert s.committed_at >= max(o.end_s for o in ops)
        assert rec.ended is not None and rec.ended.steps_run == 3
    leader = hooks[0][0]
    assert {s.step: s.loss for s in leader.steps} == leader_fit.losses
    assert all(s.loss is None and s.votes is None for s in hooks[1][0].steps)
    assert leader.ended.report is not None and leader.ended.report["samples"]["lost"] == 0

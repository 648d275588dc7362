"""Odyssey side of `engine_vs_deepspeed.py --profile`: examples/train_gpt.py plus timers.

Runs `examples/train_gpt.py` (same flags) with a trainer hook (`odyssey.hooks`) that
records, per committed step, on each rank `$ODYSSEY_BENCH_PROFILE_DIR/rank{r}.json`:

* `op_seconds`: the engine's own per-instruction seconds (`StepResult.op_seconds`),
* `op_cpu_seconds`: main-thread CPU seconds per instruction kind (the engine's op hook),
* `run_step_s`: the whole `Engine.run_step`; `cpu_s`: process CPU time (all threads)
  from the end of the previous step's bookkeeping to this step's last instruction,
* `record_s`: the leader's bookkeeping after the commit (votes, calibration, ledger and
  metrics, the telemetry hook; 0 on the other ranks),
* `flat_grads_s`, `vote_s`: `Engine._flat_grads` (torch.cat of the gradients for the
  all-reduce) and `CommitProtocol.vote` (store set + add + waiting for the decision),
  both inside one instruction, so timed by wrapping them from the outside,
and, for the whole run, `thread_cpu_s`: CPU seconds of every thread of the process.

Started by torchrun exactly like train_gpt.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import thread_cpu  # noqa: E402
from examples import train_gpt  # noqa: E402
from odyssey import commit as commit_mod  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey import engine as engine_mod  # noqa: E402
from odyssey.engine import OpTiming  # noqa: E402
from odyssey.hooks import CommittedStep, FitResult, Recovery, TrainerHook  # noqa: E402

_inside_ops: dict[str, float] = defaultdict(float)  # the two wrapped functions, this step


def _timed(cls, name: str, key: str) -> None:
    fn = getattr(cls, name, None)
    if fn is None:  # the engine changed under us: profile what still exists
        return

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            _inside_ops[key] += time.perf_counter() - t

    setattr(cls, name, wrapper)


class StepProfile(TrainerHook):
    """Collects the per-step record above; writes it when `fit` ends."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._op_cpu: dict[str, float] = defaultdict(float)
        self._cpu_mark = time.process_time()
        self._last_op_cpu = self._cpu_mark

    def on_op(self, op: OpTiming) -> None:
        self._op_cpu[op.instruction.op.value] += op.thread_cpu_s
        self._last_op_cpu = time.process_time()

    def on_step_committed(self, step: CommittedStep) -> None:
        self.steps.append({
            "step": step.step, "run_step_s": step.result.seconds,
            "cpu_s": self._last_op_cpu - self._cpu_mark,
            "op_seconds": dict(step.result.op_seconds), "op_cpu_seconds": dict(self._op_cpu),
            "flat_grads_s": _inside_ops.get("flat_grads_s", 0.0),
            "vote_s": _inside_ops.get("vote_s", 0.0),
            "record_s": time.perf_counter() - step.committed_at if step.leader else 0.0})
        self._reset()

    def on_recovered(self, recovery: Recovery) -> None:
        self._reset()  # the aborted step's partial timings

    def on_fit_end(self, result: FitResult) -> None:
        d = Path(os.environ.get(contract.ENV_BENCH_PROFILE_DIR, "build/odyssey_profile"))
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{result.worker_id}.json").write_text(
            json.dumps({"rank": result.worker_id, "steps": self.steps,
                        "thread_cpu_s": thread_cpu()}))

    def _reset(self) -> None:
        self._op_cpu.clear()
        _inside_ops.clear()
        self._cpu_mark = self._last_op_cpu = time.process_time()


if __name__ == "__main__":
    _timed(engine_mod.Engine, "_flat_grads", "flat_grads_s")
    _timed(commit_mod.CommitProtocol, "vote", "vote_s")
    train_gpt.main(hooks=[StepProfile()])

"""Odyssey side of `engine_vs_deepspeed.py --profile`: examples/train_gpt.py plus timers.

Runs `examples/train_gpt.py` unchanged (same flags) after wrapping, from the outside, a few
functions with wall-clock timers; nothing in odyssey/ is edited. Each rank writes
`$ODYSSEY_BENCH_PROFILE_DIR/rank{r}.json` with, per step:

* `op_seconds`: the engine's own per-instruction seconds (`StepResult.op_seconds`),
* `run_step_s`: the whole `Engine.run_step`; `cpu_s`: process CPU time (all threads) in it,
* `flat_grads_s`: `Engine._flat_grads` (torch.cat of the gradients for the all-reduce),
* `vote_s`: `CommitProtocol.vote` (store set + add + waiting for the decision key),
* `record_s`: `Trainer._record` (leader: multi_get of the votes, ledger/metrics appends),
* `op_cpu_seconds`: main-thread CPU seconds per instruction kind (time.thread_time),
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
from odyssey import trainer as trainer_mod  # noqa: E402

_acc: dict[str, float] = defaultdict(float)
_steps: list[dict] = []


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
            _acc[key] += time.perf_counter() - t

    setattr(cls, name, wrapper)


def _install() -> None:
    _timed(engine_mod.Engine, "_flat_grads", "flat_grads_s")
    _timed(commit_mod.CommitProtocol, "vote", "vote_s")
    _timed(trainer_mod.Trainer, "_record", "record_s")

    execute = engine_mod.Engine._execute

    @functools.wraps(execute)
    def execute_wrapper(self, ins, st, *a, **kw):  # main-thread CPU seconds per op kind
        c = time.thread_time()
        try:
            return execute(self, ins, st, *a, **kw)
        finally:
            _acc["cpu:" + ins.op.value] += time.thread_time() - c

    engine_mod.Engine._execute = execute_wrapper

    run_step = engine_mod.Engine.run_step

    @functools.wraps(run_step)
    def run_step_wrapper(self, step, *a, **kw):
        if _steps:  # _record of the previous step ran after its run_step: fold it in
            _steps[-1]["record_s"] = _acc.pop("record_s", 0.0)
        _acc.clear()
        t, c = time.perf_counter(), time.process_time()
        res = run_step(self, step, *a, **kw)
        _steps.append({"step": step, "run_step_s": time.perf_counter() - t,
                       "cpu_s": time.process_time() - c,
                       "op_seconds": dict(res.op_seconds),
                       "op_cpu_seconds": {k[4:]: v for k, v in _acc.items()
                                          if k.startswith("cpu:")},
                       "flat_grads_s": _acc.pop("flat_grads_s", 0.0),
                       "vote_s": _acc.pop("vote_s", 0.0)})
        return res

    engine_mod.Engine.run_step = run_step_wrapper

    fit = trainer_mod.Trainer.fit

    @functools.wraps(fit)
    def fit_wrapper(self, *a, **kw):
        out = fit(self, *a, **kw)
        if _steps:
            _steps[-1]["record_s"] = _acc.pop("record_s", 0.0)
        d = Path(os.environ.get(contract.ENV_BENCH_PROFILE_DIR, "build/odyssey_profile"))
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{self.worker.rank}.json").write_text(
            json.dumps({"rank": self.worker.rank, "steps": _steps,
                        "thread_cpu_s": thread_cpu()}))
        return out

    trainer_mod.Trainer.fit = fit_wrapper


if __name__ == "__main__":
    _install()
    train_gpt.main()

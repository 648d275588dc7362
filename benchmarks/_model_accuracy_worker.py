"""examples/train_gpt.py with every instruction's start and end recorded (diagnostics).

Used by `benchmarks/model_accuracy.py` for the single-stage calibration runs (per-
instruction observations for `CostModel.observe`) and by `--diagnose`. Each rank keeps
(op, microbatch, start, end) per instruction on the system-wide monotonic clock, so
ranks' timelines can be compared, and writes them after its last step (no file I/O
inside the timed loop) to $ODYSSEY_OPLOG_DIR/ops-rank{r}.jsonl, one line per step. The
engine is patched from outside (class attributes); its code is not changed. A run that
recovers from a failure repeats steps; these tools do not inject any.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odyssey import commit as _commit  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey import engine as _engine  # noqa: E402

_execute = _engine.Engine._execute
_run_step = _engine.Engine.run_step
_vote = _commit.CommitProtocol.vote
_CURRENT: list = []  # the running step's op log (one engine per worker process)


def _timed_vote(self, worker_id, step, payload):
    """The commit protocol's store part (vote, count, decide, wait for the decision),
    recorded as a 'vote' entry inside the engine's 'commit' instruction."""
    t0 = time.monotonic()
    try:
        return _vote(self, worker_id, step, payload)
    finally:
        _CURRENT.append(("vote", -1, t0, time.monotonic()))


def _timed_execute(self, ins, st):
    t0 = time.monotonic()
    try:
        return _execute(self, ins, st)
    finally:
        self._oplog.append((ins.op.value, ins.microbatch, t0, time.monotonic()))


def _last_step() -> int:
    argv = sys.argv
    return int(argv[argv.index("--steps") + 1]) - 1 if "--steps" in argv else 29


_LAST = _last_step()
_STEPS: list[dict] = []


def _logged_run_step(self, step):
    self._oplog = _CURRENT
    _CURRENT.clear()
    t0 = time.monotonic()
    res = _run_step(self, step)
    _STEPS.append({"step": step, "start": t0, "end": time.monotonic(),
                   "ops": list(self._oplog)})
    if step == _LAST:  # written once, after the last step: no file I/O inside the loop
        out = Path(os.environ[contract.ENV_OPLOG_DIR]) / f"ops-rank{self.worker_id}.jsonl"
        out.write_text("".join(json.dumps(s) + "\n" for s in _STEPS))
    return res


_engine.Engine._execute = _timed_execute
_engine.Engine.run_step = _logged_run_step
_commit.CommitProtocol.vote = _timed_vote

if __name__ == "__main__":
    from examples.train_gpt import main

    main()

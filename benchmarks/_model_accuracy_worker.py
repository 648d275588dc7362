"""examples/train_gpt.py with every instruction's start and end recorded (diagnostics).

Used by `benchmarks/model_accuracy.py` for the single-stage calibration runs (per-
instruction observations for `CostModel.observe`) and by `--diagnose`. Each rank keeps
(op, microbatch, start, end) per instruction on `time.perf_counter()` (CLOCK_MONOTONIC on
Linux: one clock for every rank of the host, so timelines can be compared), from the
engine's op hook, and writes them when `fit` ends (no file I/O inside the timed loop) to
$ODYSSEY_OPLOG_DIR/ops-rank{r}.jsonl, one line per committed step. The commit
protocol's store part has no hook of its own (it runs inside the commit instruction), so
`CommitProtocol.vote` is wrapped to add a 'vote' entry. A run that recovers from a
failure repeats steps; these tools do not inject any.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.train_gpt import main  # noqa: E402
from odyssey import commit as _commit  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey.engine import OpTiming  # noqa: E402
from odyssey.hooks import CommittedStep, FitResult, Recovery, TrainerHook  # noqa: E402

_vote = _commit.CommitProtocol.vote
_CURRENT: list = []  # the running step's op log (one engine per worker process)


def _timed_vote(self, worker_id, step, payload):
    """The commit protocol's store part (vote, count, decide, wait for the decision),
    recorded as a 'vote' entry inside the engine's 'commit' instruction."""
    t0 = time.perf_counter()
    try:
        return _vote(self, worker_id, step, payload)
    finally:
        _CURRENT.append(("vote", -1, t0, time.perf_counter()))


class OpLog(TrainerHook):
    """Each committed step's instructions, kept in memory and written at the end."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_op(self, op: OpTiming) -> None:
        ins = op.instruction
        _CURRENT.append((ins.op.value, ins.microbatch, op.start_s, op.end_s))

    def on_step_committed(self, step: CommittedStep) -> None:
        end = step.committed_at
        self.steps.append({"step": step.step, "start": end - step.result.seconds,
                           "end": end, "ops": list(_CURRENT)})
        _CURRENT.clear()

    def on_recovered(self, recovery: Recovery) -> None:
        _CURRENT.clear()  # the aborted step's instructions

    def on_fit_end(self, result: FitResult) -> None:
        out = Path(os.environ[contract.ENV_OPLOG_DIR]) / f"ops-rank{result.worker_id}.jsonl"
        out.write_text("".join(json.dumps(s) + "\n" for s in self.steps))


if __name__ == "__main__":
    _commit.CommitProtocol.vote = _timed_vote
    main(hooks=[OpLog()])

"""Run artefacts written by the leader: metrics JSONL, the sample ledger, report.json.

The ledger records, per committed step, the sample ids whose loss the last stages
computed. Steps rolled back by a restart are dropped from it, so the report's `lost` and
`duplicated` counts describe exactly what the final model was trained on.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from odyssey import contract
from odyssey.engine import expand_ranges


class RunLog:
    """Append-only JSONL files in the run directory (leader only)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / contract.METRICS_FILE
        self.ledger_path = self.dir / contract.LEDGER_FILE
        self.events_path = self.dir / contract.EVENTS_FILE
        self.eval_path = self.dir / contract.EVAL_FILE

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metric(self, record: dict) -> None:
        self._append(self.metrics_path, {"time": time.time(), **record})

    def ledger(self, step: int, generation: int, samples: list[list[int]]) -> None:
        self._append(self.ledger_path, {"step": step, "gen": generation, "samples": samples})

    def eval(self, record: dict) -> None:
        self._append(self.eval_path, {"time": time.time(), **record})

    def event(self, record: dict) -> None:
        self._append(self.events_path, {"time": time.time(), **record})

    def rollback_to(self, step: int) -> None:
        """Forget ledger, metric and eval entries of steps after `step` (they will be
        redone)."""
        for path in (self.ledger_path, self.metrics_path, self.eval_path):
            if path.exists():
                keep = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", -1) <= step]
                path.write_text("".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ledger_counts(ledger: list[dict], expected_ids: set[int]) -> dict:
    """Expected/trained/lost/duplicated sample counts from ledger records."""
    seen: dict[int, int] = {}
    for rec in ledger:
        for s in expand_ranges(rec["samples"]):
            seen[s] = seen.get(s, 0) + 1
    trained = sum(1 for s in seen if s in expected_ids)
    return {
        "expected": len(expected_ids),
        "trained": trained,
        "lost": len(expected_ids - seen.keys()),
        "duplicated": sum(n - 1 for n in seen.values()),
        "unexpected": sum(1 for s in seen if s not in expected_ids),
    }


def build_report(run_log: RunLog, *, mode: str, world_size: int, plan: dict, steps: int,
                 global_batch: int, samples_this_run: int, train_seconds: float,
                 extra: dict | None = None, expected_samples: int | None = None) -> dict:
    """Write report.json. Throughput counts only the steps this process ran (a resumed
    run does not get credit for steps trained before the restart). `expected_samples`:
    how many sample ids the run's steps cover (default steps x global_batch; a resume
    under another batch layout changes it)."""
    metrics = read_jsonl(run_log.metrics_path)
    ledger = read_jsonl(run_log.ledger_path)
    evals = read_jsonl(run_log.eval_path)
    expected = set(range(steps * global_batch if expected_samples is None
                         else expected_samples))
    counts = ledger_counts(ledger, expected)
    losses = [m["loss"] for m in metrics if "loss" in m]
    step_times = [m["step_time_s"] for m in metrics if "step_time_s" in m]
    report = {
        "mode": mode,
        "world_size": world_size,
        "plan": plan,
        "steps": steps,
        "global_batch": global_batch,
        "samples": counts,
        "loss": {"first": losses[0] if losses else None,
                 "final": losses[-1] if losses else None},
        "throughput_samples_per_s": (samples_this_run / train_seconds
                                     if train_seconds > 0 else None),
        "step_time_s": statistics.median(step_times) if step_times else None,
        "events": read_jsonl(run_log.events_path),
        "eval": {"final_val_loss": evals[-1]["val_loss"] if evals else None,
                 "val_loss": {e["step"]: e["val_loss"] for e in evals}},
    }
    report.update(extra or {})
    (run_log.dir / contract.REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report

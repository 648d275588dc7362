"""The leader's record of a run, fed through the trainer's hooks.

metrics.jsonl, the sample ledger, eval.jsonl and events.jsonl (`odyssey.report.RunLog`),
optional TensorBoard scalars, the progress line, the `[gen g step k rank r]` log lines and, at the
end, report.json. Every rank holds one; only the leader writes (a step's votes reach
the hook on the leader only), so a new leader simply starts writing where the old one
stopped, after filling the ledger line it may have missed (`take_over`).

A step's ledger line is written as soon as it commits (`on_step_committed`); its metrics
record once the user callbacks ran (`write_step`, called by the trainer after every
hook's `on_step_end`), so the scalars they log land in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from odyssey import contract
from odyssey.events import recovery_event
from odyssey.hooks import CommittedStep, EvalResult, Recovery, TrainerHook
from odyssey.job_config import JobConfig
from odyssey.optim import lr_at
from odyssey.progress import ProgressLine
from odyssey.report import RunLog, build_report, read_jsonl
from odyssey.step_result import step_metrics
from odyssey.tb import TensorBoardLog, require_tensorboard
from planner.decision import RecoveryDecision
from planner.plan import Plan


class Telemetry(TrainerHook):
    """Writes the run's artefacts and prints its lines; see the module docstring."""

    def __init__(self, job: JobConfig, run_dir: Path, store: dist.Store, rank: int,
                 global_batch: int):
        self.run_dir = run_dir
        self.global_batch = global_batch  # the same under every plan
        self.store = store
        self.rank = rank
        self.mode = job.training.mode
        self.steps = job.training.steps
        self.optimizer = job.optimizer.resolved(job.training.steps)
        self.log_every = max(1, job.training.log_every)
        self.tensorboard = job.metrics.tensorboard
        if self.tensorboard:
            require_tensorboard()  # fail on every rank at start, not on a later leader
        self.progress = ProgressLine(self.steps, job.metrics.progress,
                                     job.metrics.progress_every_s)
        self._log: RunLog | None = None
        self._tb: TensorBoardLog | None = None
        self._pending: RecoveryDecision | None = None  # logged with its redone step
        self._plan_kind = "initial"
        self._record: dict | None = None  # the committed step's, until `write_step`
        self.expected_samples: int | None = None
        """Sample ids the run's steps cover, when not steps x global batch (a resume
        under another batch layout); the report's ledger counts use it."""

    @property
    def log(self) -> RunLog:
        if self._log is None:
            self._log = RunLog(self.run_dir)
        return self._log

    @property
    def tb(self) -> TensorBoardLog | None:
        if self.tensorboard and self._tb is None:
            self._tb = TensorBoardLog(self.run_dir)
        return self._tb

    def say(self, msg: str, step: int, generation: int) -> None:
        """One tagged line (the progress line is cleared first and redrawn later)."""
        self.progress.interrupt()
        print(f"[gen {generation} step {step} rank {self.rank}] {msg}", flush=True)

    # ---- leader only -------------------------------------------------------------------
    def resumed(self, start: int, checkpoint_step: int | None, attempt: int) -> None:
        """The run (re)starts at `start`: forget later ledger lines, note a resume."""
        self.log.rollback_to(start - 1)
        if checkpoint_step is not None:
            self.log.event({"kind": "resume", "checkpoint_step": checkpoint_step,
                            "attempt": attempt})

    def take_over(self, committed: int, generation: int, initial_ranks: list[int]) -> None:
        """A new leader fills the ledger line of step `committed` (of `generation`) if the
        old one died right after that commit, from the votes still in the store."""
        logged = {rec["step"] for rec in read_jsonl(self.log.ledger_path)}
        if committed < 0 or committed in logged:
            return
        ranks = (json.loads(self.store.get(contract.members_key(generation)))["members"]
                 if generation > 0 else initial_ranks)
        votes = [json.loads(v) for v in self.store.multi_get(
            [contract.vote_key(generation, committed, r) for r in ranks])]
        self.log.ledger(committed, generation, sorted(r for v in votes for r in v["samples"]))
        record = {"step": committed,
                  "loss": sum(v["loss_sum"] for v in votes) / self.global_batch,
                  "mode": self.mode, "gen": generation, "recovered_by_new_leader": True,
                  "lr": lr_at(self.optimizer, committed)}  # a pure function of the step
        if all("sumsq" in v for v in votes):
            record["grad_norm"] = sum(v["sumsq"] for v in votes) ** 0.5
        self.log.metric(record)

    def report(self, *, plan: Plan, world_size: int, steps_run: int, train_s: float,
               extra: dict) -> dict:
        """Write report.json (from the files, so a new leader's report covers the run)."""
        return build_report(
            self.log, mode=self.mode, world_size=world_size, plan=plan.to_dict(),
            steps=self.steps, global_batch=self.global_batch,
            samples_this_run=steps_run * self.global_batch, train_seconds=train_s, extra=extra,
            expected_samples=self.expected_samples)

    def close(self, report: dict, generation: int) -> None:
        """End the progress line and TensorBoard; print the run's summary line."""
        self.progress.close()
        if self._tb is not None:
            self._tb.close()
        s = report["samples"]
        self.say(f"done: loss {report['loss']['first']:.4f} -> {report['loss']['final']:.4f},"
                 f" samples trained {s['trained']}/{s['expected']} (lost {s['lost']}, "
                 f"duplicated {s['duplicated']}), report {self.run_dir / contract.REPORT_FILE}",
                 self.steps - 1, generation)

    # ---- hooks ---------------------------------------------------------------------------
    def on_recovered(self, recovery: Recovery) -> None:
        self._pending = recovery.decision

    def on_step_committed(self, c: CommittedStep) -> None:
        if not c.leader:
            return
        gb, dt = self.global_batch, c.step_s
        if self._pending is not None:
            event = recovery_event(self.store, c.generation, self._pending, dt)
            self._pending = None
            self.log.event(event)
            self.log.rollback_to(event["resume_step"] - 1)
            self._plan_kind = event["chosen"]
            if self.tb is not None:
                self.tb.recovery(event)
            if event.get("background"):
                b = event["background"]
                self.say(f"switched to {event['chosen']} ({event['chosen_note']}) after a "
                         f"{b['measured_s'] * 1e3:.0f} ms background copy over {b['steps']} "
                         f"step(s): switch {event['mttr_s'] * 1e3:.0f} ms", c.step, c.generation)
            elif event["cause"] == "replan":
                self.say(f"re-planned with {event['chosen']} ({event['chosen_note']}): "
                         f"switch {event['mttr_s'] * 1e3:.0f} ms", c.step, c.generation)
            else:
                self.say(f"recovered from {event['ranks_lost'] or event['newcomers']} "
                         f"({event['cause']}) with {event['chosen']}: MTTR "
                         f"{event['mttr_s'] * 1e3:.0f} ms", c.step, c.generation)
        loss = c.loss
        self.log.ledger(c.step, c.generation,
                        sorted(r for v in c.votes.values() for r in v["samples"]))
        self._record = {"step": c.step, "loss": loss, "step_time_s": dt,
                        "samples_per_s": gb / dt if dt > 0 else None,
                        "mode": self.mode, "gen": c.generation, "world": len(c.members),
                        "data_wait_s": c.data_wait_s, **step_metrics(c.result, c.votes)}

    def write_step(self, c: CommittedStep) -> None:
        """Write the committed step's metrics record, with the scalars hooks logged."""
        record, self._record = self._record, None
        if not c.leader or record is None:
            return
        record.update(c.scalars)
        gb, dt, loss = self.global_batch, c.step_s, record["loss"]
        self.log.metric(record)
        if self.tb is not None:
            self.tb.metric(record, c.scalars)
        if c.step % self.log_every == 0 or c.step == self.steps - 1:
            self.say(f"loss {loss:.4f} | {gb / dt:8.1f} samples/s | step {dt * 1e3:7.1f} ms "
                     f"| {self.mode} | {len(c.members)} ranks", c.step, c.generation)
        self.progress.update(step=c.step, loss=loss, step_s=dt,
                             samples_per_s=record["samples_per_s"],
                             plan=plan_label(c.plan, self._plan_kind, len(c.members)),
                             gen=c.generation, rank=self.rank)

    def write_eval(self, r: EvalResult, leader: bool) -> None:
        """Write an evaluation's record (leader only) and print its line."""
        if not leader:
            return
        record = {"step": r.step, "val_loss": r.loss, "samples": r.samples,
                  "eval_s": r.seconds, "gen": r.generation, **r.scalars}
        self.log.eval(record)
        if self.tb is not None:
            self.tb.eval(record, r.scalars)
        self.say(f"val loss {r.loss:.4f} ({r.samples} samples, {r.seconds * 1e3:.0f} ms)",
                 r.step, r.generation)


def plan_label(plan: Plan, kind: str, ranks: int) -> str:
    """e.g. 'reroute 2+1 stages, 3 ranks' (kind: 'initial' or the last recovery chosen)."""
    stages = "+".join(str(len(p.stages)) for p in plan.pipelines)
    return f"{kind} {stages} stages, {ranks} ranks"


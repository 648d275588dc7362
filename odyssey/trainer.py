"""The user-facing `Trainer`: plan, compile, execute, commit, checkpoint, report.

One `Trainer` runs in each worker. The leader (lowest worker id in the plan) prints
progress, appends metrics and the sample ledger, and writes `report.json` at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from odyssey import checkpoint as ckpt
from odyssey.comm import Comm, CommConfig
from odyssey.commit import CommitProtocol
from odyssey.data import Sampler
from odyssey.engine import Engine, OptimizerConfig, StepResult
from odyssey.env import WorkerInfo
from odyssey.inject import FaultInjector, FaultSpec
from odyssey.model import LayeredModel
from odyssey.report import RunLog, build_report
from planner.plan import Plan, PlanError
from planner.program import compile_plan

log = logging.getLogger("odyssey")


@dataclass
class TrainConfig:
    """One training run."""

    steps: int = 30
    """Optimizer steps to train (step ids 0..steps-1)."""
    dp: int = 0
    """Data-parallel pipelines; 0 = world_size // pp."""
    pp: int = 1
    """Pipeline stages per pipeline."""
    num_microbatches: int = 8
    """Microbatches per step."""
    microbatch_size: int = 4
    """Samples per microbatch."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    partition: tuple[int, ...] = ()
    """Layers per stage (empty = even split)."""
    plan_file: str = ""
    """JSON Plan to run instead of dp/pp/partition (e.g. written by `odyssey plan`)."""
    mode: str = "real"
    """Compute mode reported with every figure: real (real math) or emulated (sleeps)."""
    run_dir: str = ""
    """Where metrics.jsonl, ledger.jsonl, report.json and checkpoints go (empty: the
    launcher's --run-dir, else runs/latest)."""
    log_every: int = 10
    """Print a progress line every N steps (leader only)."""
    checkpoint_every: int = 0
    """Save a per-layer checkpoint every N steps (0 = never)."""
    resume: bool = True
    """Resume from the latest complete checkpoint in run_dir, if there is one."""
    inject: tuple[str, ...] = ()
    """Faults to inject, e.g. kill:rank=1,step=6 (fire on the first attempt only)."""
    comm_timeout_s: float = 60.0
    """Last-resort timeout of one communication op."""
    lr: float = 3e-3
    """AdamW learning rate."""


@dataclass
class FitResult:
    """What `Trainer.fit` returns on each rank."""

    worker_id: int
    steps_run: int
    losses: dict[int, float] = field(default_factory=dict)
    """Per-step global loss (leader only)."""
    report: dict | None = None
    """report.json content (leader only)."""


class Trainer:
    """Runs one worker of a training job."""

    def __init__(self, model: LayeredModel, data, cfg: TrainConfig, worker: WorkerInfo,
                 device: str = "cpu", comm: CommConfig | None = None):
        self.model = model
        self.data = data
        self.cfg = cfg
        self.worker = worker
        self.device = device
        self.plan = self._make_plan()
        self.sampler = Sampler(self.plan.num_microbatches, self.plan.microbatch_size)
        self.comm_cfg = comm or CommConfig(host=worker.host, timeout_s=cfg.comm_timeout_s)
        self.engine = Engine(model, data, self.sampler, worker.rank,
                             OptimizerConfig(lr=cfg.lr), device)
        specs = [FaultSpec.parse(s, worker.world_size) for s in cfg.inject]
        self.faults = FaultInjector(specs if worker.attempt == 0 else [], worker.rank)
        self.engine.before_op = self.faults.before_op
        self.leader = worker.rank == min(self.plan.ranks)
        self.run_dir = Path(cfg.run_dir or worker.run_dir or "runs/latest")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir)
        self.run_log = RunLog(self.run_dir) if self.leader else None
        self.generation = 0

    # ---- setup ---------------------------------------------------------------------
    def _make_plan(self) -> Plan:
        c, n = self.cfg, self.worker.world_size
        if c.plan_file:
            plan = Plan.from_json(Path(c.plan_file).read_text()).validate()
        else:
            dp = c.dp or max(1, n // c.pp)
            plan = Plan.uniform(self.model.num_layers, dp, c.pp, c.num_microbatches,
                                c.microbatch_size, c.schedule,
                                partition=list(c.partition) or None)
        if plan.num_layers != self.model.num_layers:
            raise PlanError(f"plan has {plan.num_layers} layers but model {self.model.name} "
                            f"has {self.model.num_layers}")
        if plan.ranks != list(range(n)):
            raise PlanError(f"plan uses ranks {plan.ranks} but the job has world_size={n} "
                            f"(ranks 0..{n - 1}); adjust --dp/--pp or the plan file")
        return plan

    def _resume(self) -> int:
        """Load the latest complete checkpoint if allowed; return the first step to run."""
        start = 0
        step = ckpt.latest_step(self.ckpt_dir, self.model.num_layers) if self.cfg.resume else None
        if step is not None:
            meta = ckpt.read_meta(self.ckpt_dir, step)
            for i in self.engine.held_layers:
                self.engine.load_layer_state(i, ckpt.load_layer(self.ckpt_dir, step, i))
            start = meta["next_step"]
            if self.leader:
                self._say(f"resumed from checkpoint of step {step} (written under a "
                      f"{len(meta['plan']['pipelines'])}-pipeline plan)", step=start)
        if self.run_log is not None:
            self.run_log.rollback_to(start - 1)
            if step is not None:
                self.run_log.event({"kind": "resume", "checkpoint_step": step,
                                    "attempt": self.worker.attempt})
        return start

    # ---- main loop -----------------------------------------------------------------
    def fit(self) -> FitResult:
        w, cfg = self.worker, self.cfg
        torch.manual_seed(0)
        program = compile_plan(self.plan)
        comm = Comm(w.store, w.rank, self.generation, self.comm_cfg).setup(program)
        commit = CommitProtocol(w.store, self.generation, self.plan.ranks)
        self.engine.install(program, comm, commit)
        start = self._resume()
        if self.leader:
            self._say(f"training {self.model.name} ({cfg.mode} compute) on {w.world_size} ranks: "
                      f"{_describe(self.plan)}, global batch {self.plan.global_batch}, "
                      f"steps {start}..{cfg.steps - 1}", step=start)
        result = FitResult(w.rank, 0)
        t_start = last = time.perf_counter()
        for step in range(start, cfg.steps):
            self.faults.before_step(step)
            res = self.engine.run_step(step)
            now = time.perf_counter()
            if self.leader:
                result.losses[step] = self._record(step, res, commit, now - last)
            last = now
            result.steps_run += 1
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self._checkpoint(step)
        train_s = time.perf_counter() - t_start
        self.checkpointer.wait()
        if self.leader:
            result.report = build_report(
                self.run_log, mode=cfg.mode, world_size=w.world_size, plan=self.plan.to_dict(),
                steps=cfg.steps, global_batch=self.plan.global_batch,
                samples_this_run=result.steps_run * self.plan.global_batch, train_seconds=train_s,
                extra={"model": self.model.name, "launcher": w.launcher,
                       "attempt": w.attempt, "schedule": self.plan.schedule})
            w.store.set("odyssey/job/status", "done")
            s = result.report["samples"]
            self._say(f"done: loss {result.report['loss']['first']:.4f} -> "
                      f"{result.report['loss']['final']:.4f}, samples trained {s['trained']}/"
                      f"{s['expected']} (lost {s['lost']}, duplicated {s['duplicated']}), "
                      f"report {self.run_dir / 'report.json'}", step=cfg.steps - 1)
        comm.close()
        return result

    def _record(self, step: int, res: StepResult, commit: CommitProtocol, dt: float) -> float:
        votes = commit.votes(step)
        gb = self.plan.global_batch
        loss = sum(v["loss_sum"] for v in votes.values()) / gb
        samples = sorted(r for v in votes.values() for r in v["samples"])
        self.run_log.ledger(step, self.generation, samples)
        self.run_log.metric({"step": step, "loss": loss, "step_time_s": dt,
                             "samples_per_s": gb / dt if dt > 0 else None,
                             "mode": self.cfg.mode, "gen": self.generation})
        if step % max(1, self.cfg.log_every) == 0 or step == self.cfg.steps - 1:
            self._say(f"loss {loss:.4f} | {gb / dt:8.1f} samples/s | step {dt * 1e3:7.1f} ms "
                      f"| {self.cfg.mode}", step=step)
        return loss

    def _checkpoint(self, step: int) -> None:
        held = [i for i in self.engine.held_layers
                if self.plan.holders(i)[0] == self.worker.rank]
        meta = None
        if self.leader:
            meta = {"num_layers": self.model.num_layers, "next_step": step + 1,
                    "plan": self.plan.to_dict(), "global_batch": self.plan.global_batch,
                    "model": self.model.name}
        self.checkpointer.save_async(step, {i: self.engine.layer_state(i) for i in held}, meta)

    def _say(self, msg: str, step: int) -> None:
        line = f"[gen {self.generation} step {step} rank {self.worker.rank}] {msg}"
        print(line, flush=True)


def _describe(plan: Plan) -> str:
    shapes = [f"{len(p.stages)} stage(s) x {len(p.microbatches)} mb" for p in plan.pipelines]
    return f"{len(plan.pipelines)} pipeline(s) [{'; '.join(shapes)}], {plan.schedule}"


def exit_cleanly(code: int = 0) -> None:
    """Leave without running process-group destructors (they can SIGABRT at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""The user-facing `Trainer`: plan, compile, execute, commit, recover, checkpoint, report.

One `Trainer` runs in each worker. Under `odyssey run` (or ranks as threads) a lost rank
triggers in-place recovery (odyssey.coordinator); under plain torchrun the failure ends
the attempt and torchrun restarts the group, which resumes from the last checkpoint.
The leader (lowest member of the current generation) prints progress, appends metrics
and the sample ledger, and writes `report.json` at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from odyssey import checkpoint as ckpt
from odyssey import contract, ds_config
from odyssey.calibration import StepTimeModel
from odyssey.comm import CommConfig, CommError, StepAborted
from odyssey.coordinator import Coordinator, Generation
from odyssey.data import Sampler
from odyssey.engine import Engine, OptimizerConfig, StepResult, make_optimizer
from odyssey.env import WorkerInfo
from odyssey.events import recovery_event
from odyssey.inject import FaultInjector, FaultSpec
from odyssey.membership import JobFinished
from odyssey.model import LayeredModel
from odyssey.monitor import FailureMonitor, MonitorConfig
from odyssey.progress import ProgressLine
from odyssey.report import RunLog, build_report, read_jsonl
from odyssey.tb import TensorBoardLog, require_tensorboard
from odyssey.train_config import TrainConfig
from planner.plan import Plan, PlanError
from planner.recovery import POLICIES, RecoveryConfig
from profiler.profile import Profile


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
                 device: str = "cpu", comm: CommConfig | None = None,
                 profile: Profile | None = None, monitor: MonitorConfig | None = None):
        if cfg.ft_policy not in POLICIES:
            raise ValueError(f"--ft-policy must be one of {POLICIES}, got {cfg.ft_policy!r}")
        self.model = model
        self.data = data
        self.worker = worker
        self.device = device
        self.optim_cfg = OptimizerConfig(lr=cfg.lr)
        if cfg.ds_config:  # batch layout and optimizer from a DeepSpeed JSON (wins over flags)
            cfg, self.optim_cfg = ds_config.apply(cfg, worker.world_size)
        self.cfg = cfg
        self.plan = self._make_plan()
        self.sampler = Sampler(self.plan.num_microbatches, self.plan.microbatch_size)
        self.comm_cfg = comm or CommConfig(host=worker.host, timeout_s=cfg.comm_timeout_s)
        self.engine = Engine(model, data, self.sampler, worker.rank, self.optim_cfg, device)
        specs = [FaultSpec.parse(s, worker.world_size) for s in cfg.inject]
        self.faults = FaultInjector(specs if worker.attempt == 0 else [], worker.rank,
                                    on_fire=self._mark_injected)
        self.engine.before_op = self.faults.before_op
        if cfg.swap not in ("off", "auto"):
            raise ValueError(f"--swap must be 'off' or 'auto', got {cfg.swap!r}")
        if cfg.swap == "auto":
            self.engine.swap_options = {"budget": cfg.memory_budget,
                                        "min_swap_bytes": cfg.swap_min_bytes}
        self.run_dir = Path(cfg.run_dir or worker.run_dir or "runs/latest")
        self.ckpt_dir = self.run_dir / contract.CHECKPOINT_DIR
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir)
        self.run_log: RunLog | None = None
        if cfg.tensorboard:
            require_tensorboard()
        self.tb: TensorBoardLog | None = None
        self.progress = ProgressLine(cfg.steps, cfg.progress, cfg.progress_every_s)
        self._plan_kind = "initial"
        self.in_place = worker.launcher in ("odyssey", "threads")
        for name in ("heartbeat_timeout_s", "join_timeout_s", "fence_timeout_s"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, "
                                 f"got {getattr(cfg, name)}")
        mcfg = monitor or MonitorConfig(heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                                        join_timeout_s=cfg.join_timeout_s,
                                        fence_timeout_s=cfg.fence_timeout_s,
                                        poll_s=self.comm_cfg.poll_s)
        self.monitor = FailureMonitor(worker.store, worker.rank, mcfg, worker.store_factory)
        self.step_model = StepTimeModel(model, self.plan.microbatch_size, worker.store, profile)
        self.coord = Coordinator(
            worker.store, worker.rank, self.engine, self.monitor, self.comm_cfg,
            RecoveryConfig(policy=cfg.ft_policy, horizon_s=cfg.horizon_s), self.ckpt_dir,
            self.step_model.predictor, self.step_model.layer_bytes,
            lambda msg, step=-1: self._say(msg, step, always=True))
        self.coord.before_migrate = self.faults.before_migrate
        self.gen: Generation | None = None
        self.last_commit_gen = 0
        self._pending_event: dict | None = None
        self._last_gen_recorded = -1

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

    @property
    def leader(self) -> bool:
        return self.gen is not None and self.worker.rank == min(self.gen.members)

    def _log(self) -> RunLog:
        if self.run_log is None:
            self.run_log = RunLog(self.run_dir)
        return self.run_log

    def _tb(self) -> TensorBoardLog | None:
        if self.cfg.tensorboard and self.tb is None:
            self.tb = TensorBoardLog(self.run_dir)
        return self.tb

    def _resume(self) -> int:
        """Load the latest complete checkpoint if allowed; return the first step to run."""
        start = 0
        step = ckpt.latest_step(self.ckpt_dir, self.model.num_layers) if self.cfg.resume else None
        if step is not None:
            meta = ckpt.read_meta(self.ckpt_dir, step)
            for i in self.engine.held_layers:
                self.engine.load_layer_state(i, ckpt.load_layer(self.ckpt_dir, step, i))
            start = meta["next_step"]
            self._say(f"resumed from checkpoint of step {step} (written under a "
                      f"{len(meta['plan']['pipelines'])}-pipeline plan)", step=start)
        if self.leader:
            self._log().rollback_to(start - 1)
            if step is not None:
                self._log().event({"kind": "resume", "checkpoint_step": step,
                                   "attempt": self.worker.attempt})
        return start

    def _join(self) -> int | None:
        """A replacement worker: announce itself, then enter the next generation.

        Returns the first step to run, or None when the job already finished."""
        store, me = self.worker.store, self.worker.rank
        if store.check([contract.JOB_STATUS]):
            return None
        # warm up before announcing: the first optimizer step in a process pays seconds of
        # lazy imports, which must not land inside the survivors' recovery time
        warm = self.model.build_layer(0)
        opt = make_optimizer(warm, self.engine.optim_cfg)
        for p in warm.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        idx = store.add(contract.NEWCOMERS_COUNT, 1) - 1
        store.set(contract.newcomer_key(idx), str(me))
        store.wait([contract.GENERATION])
        g = int(store.get(contract.GENERATION))
        members = (json.loads(store.get(contract.members_key(g)))["members"] if g > 0
                   else self.plan.ranks)
        self.monitor.watch(g, members)
        self.monitor.publish("join", f"rank {me} joins the job", generation=g)
        self.coord.trained_plan = self.plan
        self.coord.current = Generation(g, self.plan, None, None, None, members)
        self.gen, step = self.coord.recover(-1, "joining")
        self._say(f"joined in generation {self.gen.number}", step, always=True)
        return step

    # ---- main loop -----------------------------------------------------------------
    def fit(self) -> FitResult:
        w, cfg = self.worker, self.cfg
        torch.manual_seed(0)
        self.monitor.start_heartbeat()
        if w.joining:
            try:
                step = self._join()
            except JobFinished:
                step = None
            if step is None:
                self._say("the job has already finished; nothing to join", 0, always=True)
                self.monitor.stop()
                return FitResult(w.rank, 0)
        else:
            self.gen = self.coord.begin(self.plan)
            step = self._resume()
            self.last_commit_gen = self.gen.number
            self._say(f"training {self.model.name} ({cfg.mode} compute) on {w.world_size} "
                      f"ranks: {_describe(self.plan)}, global batch {self.plan.global_batch}, "
                      f"steps {step}..{cfg.steps - 1}, recovery: "
                      f"{cfg.ft_policy if self.in_place else 'torchrun restart'}", step=step)
        committed = step - 1
        result = FitResult(w.rank, 0)
        t_start = last = time.perf_counter()
        while step < cfg.steps:
            try:
                if self.in_place:
                    if self.monitor.notice() is not None:
                        raise StepAborted("membership change announced")
                    self.faults.poll(w.store, step)
                self.faults.before_step(step)
                res = self.engine.run_step(step)
            except (StepAborted, CommError) as e:
                if not self.in_place:
                    raise
                self.engine.zero_grad()
                self.monitor.publish("failure", f"{type(e).__name__}: {e}")
                self.gen, step = self.coord.recover(committed, str(e))
                if self.gen.decision["chosen"]["from_checkpoint"]:
                    committed = step - 1
                self._pending_event = self.gen.decision
                last = time.perf_counter()
                continue
            now = time.perf_counter()
            self.coord.committed()
            if self.leader:
                self._take_over(committed)
                result.losses[step] = self._record(step, res, now - last)
            self.last_commit_gen = self.gen.number
            committed = step
            last = now
            result.steps_run += 1
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self._checkpoint(step)
            step += 1
        train_s = time.perf_counter() - t_start
        self.checkpointer.wait()
        consistent = self.coord.check_replicas()
        if self.leader:
            result.report = build_report(
                self._log(), mode=cfg.mode, world_size=w.world_size, plan=self.gen.plan.to_dict(),
                steps=cfg.steps, global_batch=self.plan.global_batch,
                samples_this_run=result.steps_run * self.plan.global_batch, train_seconds=train_s,
                extra={"model": self.model.name, "launcher": w.launcher, "attempt": w.attempt,
                       "schedule": self.plan.schedule, "ft_policy": cfg.ft_policy,
                       "initial_plan": self.plan.to_dict(), "generation": self.gen.number,
                       "replicas_identical": consistent,
                       "swap": self.engine.swap.report() if self.engine.swap else None})
            w.store.set(contract.JOB_STATUS, contract.JOB_DONE)
            self.progress.close()
            if self.tb is not None:
                self.tb.close()
            s = result.report["samples"]
            self._say(f"done: loss {result.report['loss']['first']:.4f} -> "
                      f"{result.report['loss']['final']:.4f}, samples trained {s['trained']}/"
                      f"{s['expected']} (lost {s['lost']}, duplicated {s['duplicated']}), "
                      f"report {self.run_dir / contract.REPORT_FILE}", step=cfg.steps - 1)
        self.monitor.stop()
        return result

    def _take_over(self, committed: int) -> None:
        """A new leader fills ledger lines the old one may have missed (it died right
        after a commit), from the votes still in the store."""
        log = self._log()
        logged = {rec["step"] for rec in read_jsonl(log.ledger_path)}
        if committed >= 0 and committed not in logged:
            ranks = json.loads(self.worker.store.get(
                contract.members_key(self.last_commit_gen)))["members"] \
                if self.last_commit_gen > 0 else self.plan.ranks
            votes = [json.loads(v) for v in self.worker.store.multi_get(
                [contract.vote_key(self.last_commit_gen, committed, r) for r in ranks])]
            gb = self.plan.global_batch
            log.ledger(committed, self.last_commit_gen,
                       sorted(r for v in votes for r in v["samples"]))
            log.metric({"step": committed, "loss": sum(v["loss_sum"] for v in votes) / gb,
                        "mode": self.cfg.mode, "gen": self.last_commit_gen,
                        "recovered_by_new_leader": True})

    def _record(self, step: int, res: StepResult, dt: float) -> float:
        votes = self.gen.commit.votes(step)
        self.step_model.observe_votes(votes)
        gb = self.plan.global_batch
        loss = sum(v["loss_sum"] for v in votes.values()) / gb
        samples = sorted(r for v in votes.values() for r in v["samples"])
        log = self._log()
        if self._pending_event is not None:
            event = recovery_event(self.worker.store, self.gen.number, self._pending_event, dt)
            log.event(event)
            log.rollback_to(event["resume_step"] - 1)
            self._pending_event = None
            self._plan_kind = event["chosen"]
            if self._tb() is not None:
                self.tb.recovery(event)
            self._say(f"recovered from {event['ranks_lost'] or event['newcomers']} "
                      f"({event['cause']}) with {event['chosen']}: MTTR "
                      f"{event['mttr_s'] * 1e3:.0f} ms", step=step)
        self.step_model.observe_step(self.gen.plan, dt,
                                     self._last_gen_recorded != self.gen.number)
        self._last_gen_recorded = self.gen.number
        log.ledger(step, self.gen.number, samples)
        record = {"step": step, "loss": loss, "step_time_s": dt,
                  "samples_per_s": gb / dt if dt > 0 else None,
                  "mode": self.cfg.mode, "gen": self.gen.number,
                  "world": len(self.gen.members)}
        log.metric(record)
        if self._tb() is not None:
            self.tb.metric(record)
        if step % max(1, self.cfg.log_every) == 0 or step == self.cfg.steps - 1:
            self._say(f"loss {loss:.4f} | {gb / dt:8.1f} samples/s | step {dt * 1e3:7.1f} ms "
                      f"| {self.cfg.mode} | {len(self.gen.members)} ranks", step=step)
        self.progress.update(step=step, loss=loss, step_s=dt, samples_per_s=record["samples_per_s"],
                             plan=_plan_label(self.gen.plan, self._plan_kind,
                                              len(self.gen.members)),
                             gen=self.gen.number, rank=self.worker.rank)
        return loss

    def _checkpoint(self, step: int) -> None:
        plan = self.gen.plan
        held = [i for i in plan.stage(self.worker.rank).layers
                if plan.holders(i)[0] == self.worker.rank]
        meta = None
        if self.leader:
            meta = {"num_layers": self.model.num_layers, "next_step": step + 1,
                    "plan": plan.to_dict(), "global_batch": plan.global_batch,
                    "model": self.model.name}
        self.checkpointer.save_async(step, {i: self.engine.layer_state(i) for i in held}, meta)

    def _mark_injected(self, spec: FaultSpec) -> None:
        record = json.dumps({"time": time.time(), "rank": self.worker.rank,
                             "attempt": self.worker.attempt, "spec": spec.__dict__})
        self.worker.store.set(contract.injected_key(self.worker.rank), record)
        # also on disk: under torchrun the next attempt cannot read this attempt's keys
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / contract.FAULTS_FILE, "a") as f:
            f.write(record + "\n")

    def _say(self, msg: str, step: int, always: bool = False) -> None:
        if always or self.leader:
            gen = self.gen.number if self.gen else 0
            self.progress.interrupt()
            print(f"[gen {gen} step {step} rank {self.worker.rank}] {msg}", flush=True)


def _describe(plan: Plan) -> str:
    shapes = [f"{len(p.stages)} stage(s) x {len(p.microbatches)} mb" for p in plan.pipelines]
    return f"{len(plan.pipelines)} pipeline(s) [{'; '.join(shapes)}], {plan.schedule}"


def _plan_label(plan: Plan, kind: str, ranks: int) -> str:
    """e.g. 'reroute 2+1 stages, 3 ranks' (kind: 'initial' or the last recovery chosen)."""
    stages = "+".join(str(len(p.stages)) for p in plan.pipelines)
    return f"{kind} {stages} stages, {ranks} ranks"


def exit_cleanly(code: int = 0) -> None:
    """Leave without running process-group destructors (they can SIGABRT at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fit_and_exit(make_trainer: Callable[[], Trainer]) -> None:
    """A training script's last line: build the trainer and fit, report any error, then
    leave at once (group destructors can hang or abort at interpreter exit)."""
    try:
        make_trainer().fit()
    except BaseException:
        traceback.print_exc()
        exit_cleanly(1)
    exit_cleanly(0)

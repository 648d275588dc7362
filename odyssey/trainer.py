"""The user-facing `Trainer`: plan, compile, execute, commit, recover, checkpoint, report.

One `Trainer` runs in each worker. Under `odyssey run` (or ranks as threads) a lost rank
triggers in-place recovery (odyssey.coordinator); under plain torchrun the failure ends
the attempt and torchrun restarts the group, which resumes from the last checkpoint.
The leader (lowest member of the current generation) prints progress, appends metrics
and the sample ledger, and writes `report.json` at the end (`odyssey.telemetry`, one of
the hooks every committed step and recovery is reported to).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from odyssey import contract, ds_config, emulate, step_controls
from odyssey.calibration import StepTimeModel
from odyssey.comm import CommError, StepAborted
from odyssey.coordinator import Coordinator, Generation
from odyssey.data import Sampler
from odyssey.devices import prepare_process, resolve_backend, resolve_device
from odyssey.engine import Engine, StepResult
from odyssey.entry import exit_cleanly, fit_and_exit  # scripts import them from here
from odyssey.env import WorkerInfo
from odyssey.eval import Evaluator
from odyssey.hooks import CommittedStep, FitResult, Recovery, TrainerHook, overrides_on_op
from odyssey.inject import FaultInjector, FaultSpec
from odyssey.job_config import JobConfig
from odyssey.membership import JobFinished
from odyssey.mitigation import StragglerMitigation
from odyssey.model import LayeredModel
from odyssey.monitor import FailureMonitor
from odyssey.outcome import RecoveryOutcome
from odyssey.parked import Parked, SpeedProbe, job_step, probe_once, unpark
from odyssey.prefetch import BatchLoader
from odyssey.run_checkpoints import RunCheckpoints
from odyssey.status import StatusPublisher
from odyssey.stop import StopWatch
from odyssey.stragglers import StragglerWatch
from odyssey.telemetry import Telemetry
from planner.plan import Plan, PlanError
from planner.program import Op
from profiler.profile import Profile

__all__ = ["FitResult", "JobConfig", "Trainer", "exit_cleanly", "fit_and_exit"]


class Trainer:
    """Runs one worker of a training job, as `job` says.

    `hooks` hear about every committed step, evaluation, recovery and instruction (after
    the trainer's own telemetry); `profile` seeds the recovery cost model's timings;
    `eval_data` (e.g. `TokenData.val`) is what `--eval.every` evaluates on."""

    def __init__(self, model: LayeredModel, data, job: JobConfig, worker: WorkerInfo,
                 profile: Profile | None = None,
                 hooks: Sequence[TrainerHook] = (), eval_data=None):
        self.model = model
        self.data = data
        self.worker = worker
        self.device = resolve_device(job.comm.device, worker.local_rank, job.comm.backend)
        backend = resolve_backend(job.comm.backend, self.device)
        prepare_process(self.device, backend)
        if job.training.ds_config:  # batch layout, optimizer from a DeepSpeed JSON (wins)
            job = ds_config.apply(job, worker.world_size)
        self.cfg = job
        self.plan = self._make_plan()
        self.sampler = Sampler(self.plan.num_microbatches, self.plan.microbatch_size)
        ft = job.fault_tolerance
        specs = [FaultSpec.parse(s, worker.world_size) for s in ft.inject]
        self.faults = FaultInjector(specs if worker.attempt == 0 else [], worker.rank,
                                    on_fire=self._mark_injected, token=worker.token,
                                    emulated=job.training.mode == "emulated")
        self.loader = BatchLoader(data, self.sampler, job.data.prefetch, self._batch_needs)
        self.evaluator = None
        if job.eval.every:
            if eval_data is None:
                raise ValueError("eval.every is set but the Trainer got no eval_data (e.g. "
                                 "Trainer(..., eval_data=job.data.open(seq_len).val))")
            self.evaluator = Evaluator(eval_data, job.eval, self.plan.microbatch_size,
                                       job.training.steps)
        self.engine = Engine(model, self.loader, self.sampler, worker.rank,
                             job.optimizer.resolved(job.training.steps), self.device,
                             before_op=self._before_op, precision=job.precision,
                             after_op=self.faults.after_op)
        if job.swap.mode == "auto":
            self.engine.enable_swap(job.swap.chameleon())
        self.engine.swap_to_fit(job.swap.chameleon())  # when a recovery plan needs it
        self.run_dir = Path(job.training.run_dir or worker.run_dir or "runs/latest")
        self.checkpoints = RunCheckpoints(job.checkpoint, self.run_dir, worker,
                                          model.num_layers,
                                          lambda msg: self._say(msg, -1, always=True))
        self.checkpointer = self.checkpoints.writer
        self.stop = StopWatch(worker.store, worker.rank, worker.token)
        self.telemetry = Telemetry(job, self.run_dir, worker.store, worker.rank,
                                   self.plan.global_batch)
        self.stragglers = StragglerWatch(job.straggler, lambda e: self.telemetry.log.event(e),
                                         self.telemetry.say,
                                         on_change=lambda c, slow: self.mitigation
                                         .stragglers_changed(c, slow))
        self.status = StatusPublisher(
            worker.store, worker.rank, self.run_dir, mode=job.training.mode,
            steps=job.training.steps, prometheus_addr=job.metrics.prometheus_addr,
            last_checkpoint=lambda: self.checkpointer.last_complete,
            stragglers=lambda: [*self.stragglers.current(), *self.mitigation.parked()])
        self.hooks: list[TrainerHook] = [self.telemetry, self.stragglers, self.status, *hooks]
        for hook in self.hooks:
            if overrides_on_op(hook):
                self.engine.add_op_hook(hook.on_op)
        self.in_place = worker.launcher in ("odyssey", "threads")
        self.monitor = FailureMonitor(worker.store, worker.rank, job.monitor,
                                      worker.store_factory, token=worker.token)
        self.step_model = StepTimeModel(model, self.plan.microbatch_size, worker.store, profile,
                                        precision=job.precision)
        self.coord = Coordinator(
            worker.store, worker.rank, self.engine, self.monitor,
            replace(job.comm, host=worker.host, backend=backend), ft, self.checkpoints.dir,
            self.step_model.predictor, self.step_model.layer_bytes,
            lambda msg, step=-1: self._say(msg, step, always=True),
            before_migrate=self.faults.before_migrate,
            memory_model=self.step_model.memory_model, partitioner=self.step_model.partitioner,
            copy_bandwidth=self.step_model.host_copy_Bps)
        # under torchrun a re-plan would be a restart: find stragglers, never re-plan
        self.mitigation = StragglerMitigation(replace(job.straggler, mitigate=job.straggler
                                                      .mitigate and self.in_place),
                                              ft, self.coord, self.step_model,
                                              lambda e: self.telemetry.log.event(e),
                                              self.telemetry.say,
                                              can_fence=worker.launcher == "odyssey")
        self.hooks.insert(2, self.mitigation)
        self.hooks.insert(3, RecoveryOutcome(lambda e: self.telemetry.log.event(e)))
        self.gen: Generation | None = None
        self.last_commit_gen = 0
        self._last_gen_recorded = -1

    # ---- setup ---------------------------------------------------------------------
    def _make_plan(self) -> Plan:
        par, t, n = self.cfg.parallelism, self.cfg.training, self.worker.world_size
        if par.plan_file:
            plan = Plan.from_json(Path(par.plan_file).read_text()).validate()
        else:
            dp = par.dp or max(1, n // par.pp)
            plan = Plan.uniform(self.model.num_layers, dp, par.pp, t.num_microbatches,
                                t.microbatch_size, t.schedule,
                                partition=list(par.partition) or None)
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

    def _resume(self) -> int:
        """Load the latest complete checkpoint if allowed; return the first step to run."""
        start, step, skipped = 0, None, []
        if self.cfg.checkpoint.resume:
            good, skipped = self.checkpoints.find(self.plan)
            step = good.step if good is not None else None
        for bad, problems in skipped:  # newer checkpoints that do not verify
            self._say(f"skipping checkpoint of step {bad}: {'; '.join(problems)}", step=0)
            if self.leader:
                self.telemetry.log.event({"kind": "checkpoint_skipped", "checkpoint_step": bad,
                                          "problems": problems, "resumed_from": step})
        if step is not None:
            meta = good.meta
            self.engine.load_checkpoint(self.checkpoints.dir, step)
            start = meta["next_step"]
            self._continue_samples(start, meta)
            self._say(f"resumed from checkpoint of step {step} (written under a "
                      f"{len(meta['plan']['pipelines'])}-pipeline plan)", step=start)
        if self.leader:
            self.telemetry.resumed(start, step, self.worker.attempt)
        return start

    def _before_op(self, step: int, op: Op) -> None:
        self.faults.before_op(step, op)
        # notify control plane: the notice is a local flag, so leave between ops instead
        # of finishing the step's remaining compute before the next wait looks at it.
        # Never after COMMIT: a committed step is applied by everyone.
        if op is not Op.OPTIMIZER_STEP and self.monitor.notified:
            self._abort_point()

    def _abort_point(self) -> None:
        if (n := self.monitor.notice()) is not None:
            raise StepAborted(f"membership change announced: {n['reason']}")

    def _join(self, rejoin: bool = False) -> int | None:
        """A replacement worker (or a parked rank back at speed: `rejoin`): announce
        itself, then enter the next generation.

        Returns the first step to run, or None when the job already finished."""
        store, me = self.worker.store, self.worker.rank
        if store.check([contract.JOB_STATUS]):
            return None
        # warm up before announcing: the first optimizer step in a process pays seconds of
        # lazy imports, which must not land inside the survivors' recovery time
        if not rejoin:
            self.engine.warm_up()
        if store.check([contract.JOB_STATUS]):  # it finished while this rank warmed up
            return None
        idx = store.add(contract.NEWCOMERS_COUNT, 1) - 1
        store.set(contract.newcomer_key(idx), str(me))
        if store.check([contract.SAMPLER_BASE]):  # the job resumed under a new layout
            base = json.loads(store.get(contract.SAMPLER_BASE))
            self.sampler.rebase(base["first_step"], base["first_sample"])
        store.wait([contract.GENERATION])
        g = int(store.get(contract.GENERATION))
        members = (json.loads(store.get(contract.members_key(g)))["members"] if g > 0
                   else self.plan.ranks)
        self.monitor.watch(g, members)
        self.monitor.publish("join", f"rank {me} {'rejoins' if rejoin else 'joins'} the job",
                             generation=g)
        self.coord.adopt(self.plan, g, members)
        self.gen, step = self.coord.recover(-1, "joining")
        self._say(f"joined in generation {self.gen.number}", step, always=True)
        return step

    def _next_generation(self, reason: str, committed: int, eval_due: int | None
                         ) -> tuple[int, int, int | None] | None:
        """Into the next generation (a failure, a re-plan, a two-phase switch): its first
        step, the step committed before it and the evaluation still due; None when this
        rank was parked until the job finished."""
        step = self._recover(committed, reason)
        if step is None:
            return None
        if self.worker.rank in self.gen.decision.newcomers:
            # rejoined from a park: the others went on, and evaluated without it
            committed, eval_due = step - 1, None
        if self.gen.decision.chosen.from_checkpoint:
            committed = step - 1
            if eval_due is not None and eval_due > committed:
                eval_due = None  # its step is redone, and its evaluation with it
        self._recovered(step)
        return step, committed, eval_due

    def _recover(self, committed: int, reason: str) -> int | None:
        """Into the next generation: its first step to run. A rank parked by straggler
        mitigation probes its speed first and rejoins once it is fast again (None: the
        job finished meanwhile)."""
        try:
            self.gen, step = self.coord.recover(committed, reason)
            return step
        except Parked as p:
            return self._park(p.record)

    def _park(self, record: dict) -> int | None:
        store, cfg = self.worker.store, self.cfg.straggler
        step = record["step"] + 1
        self._say(f"parked: {record['reason']}; probing my speed every "
                  f"{cfg.probe_every_s:g} s", step, always=True)
        probe = SpeedProbe(cfg, self.worker.rank, record["factor"], record["reference_s"],
                           functools.partial(probe_once, self.engine, self.faults),
                           done=lambda: store.check([contract.JOB_STATUS]),
                           step=lambda: job_step(store))
        factor = probe.wait_until_fast()
        if factor is None:
            return None
        self._say(f"probed at {factor:.2f}x after {probe.probes} probes: rejoining", step,
                  always=True)
        unpark(store, self.worker.rank, record, factor, probe.probes)
        try:
            return self._join(rejoin=True)
        except JobFinished:
            return None

    # ---- main loop -----------------------------------------------------------------
    def fit(self) -> FitResult:
        w, t, ft = self.worker, self.cfg.training, self.cfg.fault_tolerance
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
            self._say(f"training {self.model.name} ({t.mode} compute) on {w.world_size} "
                      f"ranks: {_describe(self.plan)}, global batch {self.plan.global_batch}, "
                      f"steps {step}..{t.steps - 1}, recovery: "
                      f"{ft.policy if self.in_place else 'torchrun restart'}", step=step)
        committed = step - 1
        result = FitResult(w.rank, 0)
        t_start = last = time.perf_counter()
        stopped = False
        eval_due: int | None = None  # a committed step whose evaluation is still to run
        while step < t.steps or eval_due is not None:
            self.checkpointer.poll()
            # the step-boundary reads: from the last commit decision (its last voter read
            # them for everyone), else (a generation's first step) from the store
            known = (self.gen.commit.last_control or step_controls.read(w.store)
                     if self.in_place else None)
            if self.in_place and self.stop.stop_before(step, known):
                stopped = True
                self.monitor.publish("stop", f"stop requested ({self.stop.reason})")
                break
            if self.in_place and known.get("switch"):  # two-phase: every member, here
                nxt = self._next_generation("two-phase switch", committed, eval_due)
                if nxt is None:
                    return self._left(result)
                step, committed, eval_due = nxt
                last = time.perf_counter()
                continue
            try:
                if self.in_place:
                    if self.monitor.notice() is not None:
                        raise StepAborted("membership change announced")
                    self.faults.poll(w.store, step, known["inject"])
                if eval_due is not None:  # redone under the new plan if a failure ends it
                    self._evaluate(eval_due, result)
                    eval_due = None
                    last = time.perf_counter()  # the next step's time leaves it out
                    continue
                self.faults.before_step(step)
                with (emulate.layer_check(self._abort_point if self.monitor.notified else None),
                      self.faults.slowed(step)):
                    res = self.engine.run_step(step)
            except (StepAborted, CommError) as e:
                if not self.in_place:
                    raise
                self.engine.zero_grad()
                if self.stop.agreed() == step:  # aborted by the stop: leave, not recover
                    stopped = True
                    break
                self.monitor.publish("failure", f"{type(e).__name__}: {e}")
                nxt = self._next_generation(str(e), committed, eval_due)
                if nxt is None:
                    return self._left(result)
                step, committed, eval_due = nxt
                last = time.perf_counter()
                continue
            now = time.perf_counter()
            self.coord.committed()
            loss = self._on_commit(step, res, now, now - last, committed)
            if loss is not None:
                result.losses[step] = loss
            self.last_commit_gen = self.gen.number
            committed = step
            last = now
            result.steps_run += 1
            every = self.cfg.checkpoint.every
            if every and (step + 1) % every == 0:
                self._checkpoint(step)
            if self.evaluator is not None and self.evaluator.due(step):
                eval_due = step
            step += 1
        return self._finish(result, step, committed, stopped,
                            time.perf_counter() - t_start)

    def _finish(self, result: FitResult, step: int, committed: int, stopped: bool,
                train_s: float) -> FitResult:
        """The end of the run (or a stop before `step`): the last checkpoint, the replica
        check and, on the leader, the report."""
        w, ft = self.worker, self.cfg.fault_tolerance
        self.coord.stop_background()  # a two-phase copy the run ended before switching
        c = self.cfg.checkpoint
        if ((c.every or stopped) and c.at_end and committed >= 0
                and self.checkpointer.saved != committed):
            self._checkpoint(committed)  # the end (or a stop): nothing to redo on rerun
        self.checkpointer.flush()
        self.loader.close()
        if stopped:
            self._say(f"stopped before step {step} on request; the last committed step "
                      f"{committed} is checkpointed: run the same command to resume", step)
            self.monitor.stop()
            return result
        consistent = self.coord.check_replicas()
        if self.leader:
            result.report = self.telemetry.report(
                plan=self.gen.plan, world_size=w.world_size, steps_run=result.steps_run,
                train_s=train_s,
                extra={"model": self.model.name, "launcher": w.launcher, "attempt": w.attempt,
                       "schedule": self.plan.schedule, "ft_policy": ft.policy,
                       "initial_plan": self.plan.to_dict(), "generation": self.gen.number,
                       "replicas_identical": consistent, "swap": self.engine.swap_report()})
            w.store.set(contract.JOB_STATUS, contract.JOB_DONE)
            self.telemetry.close(result.report, self.gen.number)
        for hook in self.hooks:
            hook.on_fit_end(result)
        self.monitor.stop()
        return result

    def _left(self, result: FitResult) -> FitResult:
        """A parked rank whose job finished before it rejoined: nothing more to do."""
        self._say("the job finished while this rank was parked", -1, always=True)
        self.checkpointer.flush()
        self.loader.close()
        self.monitor.stop()
        return result

    def _recovered(self, step: int) -> None:
        recovery = Recovery(self.gen.number, self.gen.decision, step)
        for hook in self.hooks:
            hook.on_recovered(recovery)

    def _on_commit(self, step: int, res: StepResult, at: float, dt: float, previous: int
                   ) -> float | None:
        """Calibrate from the votes (leader), then tell the hooks; the global loss on the
        leader, else None. `previous`: the step committed before this one."""
        votes = None
        if self.leader:
            self.telemetry.take_over(previous, self.last_commit_gen, self.plan.ranks)
            votes = self.gen.commit.votes(step)
            self.step_model.observe_votes(votes)
            self.step_model.observe_step(self.gen.plan, dt,
                                         self._last_gen_recorded != self.gen.number)
            self._last_gen_recorded = self.gen.number
        done = CommittedStep(step, self.gen.number, self.gen.plan, self.gen.members,
                             self.worker.rank, res, at, dt, votes, self.loader.take_wait_s())
        for hook in self.hooks:
            hook.on_step_committed(done)
        for hook in self.hooks:
            hook.on_step_end(done)
        self.telemetry.write_step(done)
        return done.loss

    def _evaluate(self, step: int, result: FitResult) -> None:
        """Validation loss after `step` (collective; raises like a step on a failure)."""
        r = self.evaluator.run(step, self.engine, self.gen.number, self.worker.rank,
                               before=self.faults.before_eval)
        result.val_losses[step] = r.loss
        for hook in self.hooks:
            hook.on_eval(r)
        self.telemetry.write_eval(r, self.leader)

    def _batch_needs(self) -> tuple[bool, bool]:
        """(inputs, targets): whether this rank's stage starts or ends the model."""
        program = self.engine.program
        if program is None:
            return True, True
        stage = program.plan.stage(self.worker.rank)
        return stage.start == 0, stage.end == self.model.num_layers

    def _continue_samples(self, start: int, meta: dict) -> None:
        """Resume after the samples the checkpoint's run consumed, whatever batch layout
        it had: step `start` begins at that sample id (never skipped or trained twice)."""
        consumed = meta.get("samples_consumed", start * meta["global_batch"])
        if consumed != self.sampler.samples_before(start):
            self.sampler.rebase(start, consumed)
            self._say(f"global batch {meta['global_batch']} -> {self.plan.global_batch}: "
                      f"step {start} continues at sample {consumed}", step=start)
            if self.leader:
                self.worker.store.set(contract.SAMPLER_BASE, json.dumps(
                    {"first_step": start, "first_sample": consumed}))
        self.telemetry.expected_samples = self.sampler.samples_before(self.cfg.training.steps)

    def _checkpoint(self, step: int) -> None:
        plan = self.gen.plan
        meta = None
        if self.leader:
            meta = {"next_step": step + 1, "plan": plan.to_dict(),
                    "global_batch": plan.global_batch,
                    "samples_consumed": self.sampler.samples_before(step + 1),
                    "model": self.model.name}
        self.checkpoints.save(step, self.gen.number, plan, self.gen.members,
                              self.engine.held.state_dict, meta)

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
            self.telemetry.say(msg, step, self.gen.number if self.gen else 0)


def _describe(plan: Plan) -> str:
    shapes = [f"{len(p.stages)} stage(s) x {len(p.microbatches)} mb" for p in plan.pipelines]
    return f"{len(plan.pipelines)} pipeline(s) [{'; '.join(shapes)}], {plan.schedule}"

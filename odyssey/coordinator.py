"""Generations and in-place recovery for one rank.

A generation is a member set with its plan, groups and commit protocol. On a
membership change the survivors: agree on the next generation (membership.py), the
leader scores every recovery candidate with the cost model and publishes its choice,
everyone builds the new groups, moves layer state from live replicas (or reloads the
checkpoint), checks replicas agree, and resumes at the step after the last committed
one with the same sample ids. A failure during any of this starts the next agreement.
A two-phase choice resumes on the reroute plan at once and copies the state of the plan
it switches to behind the training (odyssey/background_copy.py); its leader asks for the
switch once the copy is done, and the members leave for it at one step boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from odyssey import checkpoint as ckpt
from odyssey import contract, step_controls
from odyssey.background_copy import BackgroundCopy
from odyssey.comm import AbortHung, Comm, CommConfig, CommError, StepAborted
from odyssey.commit import CommitProtocol
from odyssey.devices import device_memory_bytes, host_available_bytes
from odyssey.engine import Engine
from odyssey.membership import Fenced, Membership, agree, wait_fenced
from odyssey.migrate import transport_device
from odyssey.monitor import FailureMonitor
from odyssey.parked import Parked, announce, record_of
from odyssey.replica_check import ReplicaCheck
from planner.decision import SWITCH, RecoveryDecision
from planner.memory import MemoryModel, SwapPricing
from planner.mitigation import MitigationChoice
from planner.partition import Partitioner
from planner.placement import Transfer, transfers
from planner.plan import Plan
from planner.program import Channel, Program
from planner.recovery import (
    RecoveryCandidate,
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
    check_memory,
    choose,
    score,
)


class RecoveryFailed(RuntimeError):
    """No way forward (e.g. replicas disagree after a transition)."""


@dataclass
class Generation:
    """What one rank runs in one generation."""

    number: int
    plan: Plan
    program: Program
    comm: Comm
    commit: CommitProtocol
    members: list[int]
    timeline: dict = field(default_factory=dict)
    """Wall times of this rank's recovery phases (empty for generation 0)."""
    decision: RecoveryDecision | None = None
    """The leader's published recovery decision that created this generation."""


class Coordinator:
    """Owns this rank's generations; see the module docstring.

    `before_migrate(resume_step)` is called once a transition's new groups exist, before
    any state moves (fault injection)."""

    def __init__(self, store: dist.Store, rank: int, engine: Engine, monitor: FailureMonitor,
                 comm_cfg: CommConfig, recovery: RecoveryConfig, ckpt_dir,
                 predictor: Callable[[], Callable[[Plan], float]],
                 layer_bytes: Callable[[], list[float]],
                 say: Callable[..., None],
                 before_migrate: Callable[[int], None] | None = None,
                 memory_model: Callable[[], MemoryModel] | None = None,
                 partitioner: Callable[[], Partitioner] | None = None,
                 copy_bandwidth: Callable[[], float | None] | None = None):
        self.store = store
        self.rank = rank
        self.engine = engine
        self.monitor = monitor
        self.comm_cfg = comm_cfg
        self.recovery = recovery
        self.ckpt_dir = ckpt_dir
        self.predictor = predictor
        self.layer_bytes = layer_bytes
        self.say = say
        self._before_migrate = before_migrate
        self.memory_model = memory_model  # None: candidates' memory is not predicted
        self.partitioner = partitioner  # None: fresh plans split layers evenly
        self._start_pricing = self._swap_pricing()
        self._copy_bandwidth = copy_bandwidth  # measured online while ranks swap
        self.current: Generation | None = None
        self._trained_plan: Plan | None = None  # of the last generation that committed
        self._adopted: tuple[int, list[int]] | None = None  # a joiner's starting point
        self._graveyard: list[Comm] = []  # old groups: destroying them can block
        self._interrupted = 0
        self.replicas = ReplicaCheck(store, rank, engine.layer_digests, monitor.abort_check,
                                     comm_cfg.poll_s)
        # the leader's request and its decision's policy (mitigate, or a two-phase switch)
        self._replan: tuple[MitigationChoice, str] | None = None
        self._background: BackgroundCopy | None = None  # a two-phase generation's copies
        self.on_newcomers: Callable[[list[int], int], None] | None = None
        """Leader: a decision with newcomers (parked ranks back among them) is being made
        (the newcomers, the agreement's committed step); called before it predicts."""

    @property
    def swap_pricing(self) -> SwapPricing | None:
        """How swapping is priced now: the start-up pricing, with the copy bandwidth the
        swapping ranks' lanes measured online once there is one (calibrated by the
        copies of the plan running, not only by the start-up copy)."""
        base = self._start_pricing
        bw = self._copy_bandwidth() if self._copy_bandwidth is not None else None
        if base is None or not bw:
            return base
        return dataclasses.replace(base, host_Bps=bw)

    def _swap_pricing(self) -> SwapPricing | None:
        """How the leader prices swapping to fit (None: it does not): only with a finite
        capacity and the engine able to swap; the copy bandwidth is first measured here
        (Chameleon's calibration copy, a few ms) so the decision does not wait for it, and
        the host memory a rank may swap into is read here, at the job's start."""
        rec = self.recovery
        if self.memory_model is None or not (rec.memory_aware and rec.swap_to_fit):
            return None
        if self.capacity_bytes() == float("inf"):
            return None
        bw = self.engine.host_copy_Bps()
        if bw is None:
            return None
        ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)  # torchrun's name too
        return SwapPricing(host_Bps=bw, overlap=rec.swap_overlap,
                           host_bytes=rec.host_bytes(host_available_bytes(), ranks_on_node))

    @property
    def two_phase(self) -> bool:
        """Whether two-phase candidates compete: on gloo only (a background copy over NCCL
        from another thread, beside the training's kernels, is not built: untested
        without a GPU)."""
        return self.recovery.two_phase and self.comm_cfg.backend != "nccl"

    def capacity_bytes(self) -> float:
        """Per-rank device capacity plans are checked against (inf: unchecked)."""
        return self.recovery.capacity_bytes(device_memory_bytes(self.engine.device))

    # ---- generations ---------------------------------------------------------------
    def _open(self, number: int, plan: Plan, extra: list[Channel] | None = None,
              starting: bool = False, two_phase: bool = False) -> Generation:
        program = self.engine.compile(plan)  # with the model's tied groups
        abort = self.monitor.abort_check
        comm_cfg = self.comm_cfg
        if starting:  # ranks reach their first groups at their own pace (imports, data)
            comm_cfg = dataclasses.replace(comm_cfg, setup_timeout_s=comm_cfg.timeout_s)
        if self.monitor.notified:  # abort_check is a local flag: look at it often, for free
            comm_cfg = dataclasses.replace(comm_cfg, poll_s=self.monitor.cfg.local_poll_s)
        comm = Comm(self.store, self.rank, number, comm_cfg, abort).setup(program, extra)
        # the notice's watcher thread wakes decision waiters (notify, node)
        wake = self.monitor.on_notice if self.monitor.wakes_decisions else None
        control = (functools.partial(step_controls.read, switch_gen=number) if two_phase
                   else step_controls.read)
        commit = CommitProtocol(self.store, number, plan.ranks, self.comm_cfg.poll_s, abort,
                                on_notice=wake, control=control)
        return Generation(number, plan, program, comm, commit, plan.ranks)

    def begin(self, plan: Plan, number: int = 0) -> Generation:
        gen = self._open(number, plan, starting=True)
        self.engine.install(gen.program, gen.comm, gen.commit)
        self._activate(gen)
        self._trained_plan = plan
        return gen

    def adopt(self, plan: Plan, number: int, members: list[int]) -> None:
        """A replacement worker starts from the job's generation `number` (run by
        `members` under `plan`) without training in it; `recover` joins the next one."""
        self._trained_plan = plan
        self._adopted = (number, list(members))

    def _activate(self, gen: Generation) -> None:
        if self.current is not None:
            self._graveyard.append(self.current.comm)
        self.current = gen
        self.monitor.watch(gen.number, gen.members)
        if self.rank == min(gen.members):
            self.store.set(contract.GENERATION, str(gen.number))

    def committed(self) -> None:
        """A step committed under the current generation. The leader of a two-phase
        generation asks for the switch once the background copy is done."""
        self._trained_plan = self.current.plan
        bg = self._background
        if (bg is not None and self._replan is None and self.rank == min(self.current.members)
                and bg.copied()):
            self.request_switch()

    def request_replan(self, choice: MitigationChoice, reason: str) -> None:
        """Leader: switch every member to `choice.chosen`'s plan at the next step boundary
        (the notice aborts the step in flight; nobody is lost, nothing is redone)."""
        self._replan = (choice, "mitigate")
        self.monitor.publish("replan", reason)

    def park(self, choice: MitigationChoice, step: int, factors: dict[int, float],
             reference_s: dict[int, float], reason: str) -> None:
        """Leader: take `choice.leaving` out of the plan, in the job (`odyssey.parked`:
        each probes against its `reference_s`, its full-speed time per layer and
        microbatch), and switch the others to `choice.chosen` at the next boundary."""
        for r in choice.leaving:
            announce(self.store, r, {"factor": factors.get(r, 1.0), "step": step,
                                     "reference_s": reference_s[r],
                                     "generation": self.current.number, "by": self.rank,
                                     "reason": reason})
        self.request_replan(choice, reason)

    def request_switch(self) -> None:
        """Leader: the background copy is done: switch to the plan it copied for. No
        notice, no step aborted: the request reaches every member through the next
        commit decision (`step_controls`), and they leave at the boundary after it."""
        then = self.current.decision.chosen.then
        self._replan = (MitigationChoice(then, [then]), SWITCH)
        self.store.set(contract.switch_key(self.current.number), json.dumps(
            {"time": time.time(), "reason": "two-phase: background copy done",
             "kind": "switch", "by": self.rank}))

    # ---- recovery ------------------------------------------------------------------
    def recover(self, committed_step: int, reason: str) -> tuple[Generation, int]:
        """Move to a new generation; return it and the first step to run."""
        if self.current is not None:
            number, previous = self.current.number + 1, list(self.current.members)
        elif self._adopted is not None:
            number, previous = self._adopted[0] + 1, list(self._adopted[1])
        else:
            raise RuntimeError("recover() before begin() or adopt()")
        if self.current is not None:
            self._abort(self.current.comm)
            if (parked := record_of(self.store, self.rank)) is not None:
                self._leave()
                raise Parked(parked)
        self._interrupted = 0
        while True:
            t0 = time.time()
            m: Membership | None = None
            try:
                try:
                    m = agree(self.store, self.monitor, number, self.rank, previous,
                              committed_step)
                except Fenced:
                    # parked while it was already agreeing (a failure's notice came first):
                    # the others did not expect it; it probes and rejoins like any parked
                    parked = record_of(self.store, self.rank)
                    if (self.current is None or parked is None
                            or self.monitor.fenced_or_exited(self.rank)):
                        raise
                    self._leave()
                    raise Parked(parked) from None
                t_agreed = time.time()
                decision = self._decide(m) if self.rank == m.leader else self._await_decision(m)
                t_planned = time.time()
                gen, resume = self._transition(m, decision)
                gen.timeline.update(agree_start=t0, agreed=t_agreed, planned=t_planned)
                return gen, resume
            except (StepAborted, CommError, TimeoutError) as e:
                self.say(f"recovery to generation {number} interrupted ({e}); agreeing again")
                self.monitor.publish("failure", f"during recovery: {e}", generation=number)
                if m is not None:
                    previous = m.members
                number += 1
                self._interrupted += 1

    def _leave(self) -> None:
        """Parked: out of the generation, its groups aborted; `adopt` and `recover` later
        join a new one."""
        self._end_background(False, -1)
        self._graveyard.append(self.current.comm)
        self.current = None

    def _abort(self, comm: Comm) -> None:
        """Abort the old generation's communicators (NCCL) before building new ones; a
        rank whose abort hangs fences itself: it leaves, and its exit record lets the
        others recover without it."""
        try:
            comm.abort()
        except AbortHung as e:
            self.say(f"{e}; leaving the job (exit {contract.EXIT_ABORT_HUNG})")
            os._exit(contract.EXIT_ABORT_HUNG)

    def _decide(self, m: Membership) -> RecoveryDecision:
        trained = self._trained_plan
        ctx = RecoveryContext(trained, m.members, m.committed_step, self.layer_bytes(),
                              ckpt.latest_step(self.ckpt_dir, trained.num_layers),
                              m.newcomers)
        replan, self._replan = self._replan, None
        if m.newcomers and self.on_newcomers is not None:
            self.on_newcomers(m.newcomers, m.committed_step)
        if replan is not None and not m.newcomers and m.members == sorted(
                set(trained.ranks) - set(replan[0].leaving)):
            choice, policy = replan
            if policy == SWITCH and self._background is not None:  # the copies are held
                ctx = dataclasses.replace(ctx, held_extra=self._background.incoming)
            return self._publish(m, ctx, choice, policy)  # else a failure came first
        predict = self.predictor()
        cands, dropped = self.recovery_candidates(ctx)
        score(cands, ctx, self.recovery, predict)
        chosen = choose(cands, self.recovery)
        decision = RecoveryDecision(
            generation=m.generation, chosen=chosen, policy=self.recovery.policy,
            horizon_s=self.recovery.horizon_s, members=m.members,
            committed_step=m.committed_step, agreed_at=m.decided_at, decided_at=time.time(),
            candidates=[c.row() for c in sorted(cands, key=lambda c: -c.score)],
            dropped=dropped, ranks_lost=sorted(set(trained.ranks) - set(m.members)),
            newcomers=m.newcomers, interrupted=self._interrupted,
            swap_host_Bps=pricing.host_Bps if (pricing := self.swap_pricing) else None)
        self.store.set(contract.plan_key(m.generation), json.dumps(decision.to_dict()))
        return decision

    def recovery_candidates(self, ctx: RecoveryContext
                            ) -> tuple[list[RecoveryCandidate], dict[str, str]]:
        """Leader: every feasible recovery for `ctx` (unscored) and why each other kind
        was dropped; with this rank's memory model, capacity and swap pricing."""
        memory = self.memory_model() if self.memory_model is not None else None
        part = self.partitioner() if self.partitioner is not None else None
        return build_candidates(ctx, self.predictor(), memory=memory,
                                capacity_bytes=self.capacity_bytes(),
                                drop_unfit=self.recovery.memory_aware, swap=self.swap_pricing,
                                partitioner=part, two_phase=self.two_phase)

    def drop(self, ranks: list[int], reason: str) -> bool:
        """Leader: have the launchers kill `ranks` (fence) and, once they are confirmed
        gone, announce the failure: the survivors recover without them. False (nothing
        announced) when no launcher confirmed within the fence timeout."""
        for r in ranks:
            self.monitor.fence(r, reason)
        if not wait_fenced(self.monitor, list(ranks)):
            return False
        self.monitor.publish("failure", reason, sorted(ranks))
        return True

    def _publish(self, m: Membership, ctx: RecoveryContext, replan: MitigationChoice,
                 policy: str = "mitigate") -> RecoveryDecision:
        """The leader's own re-plan request becomes the decision (every member is in)."""
        chosen = dataclasses.replace(replan.chosen, resume_step=m.committed_step + 1,
                                     transfers=transfers(ctx, replan.chosen.plan))
        if self.memory_model is not None and self.swap_pricing is not None:
            # a re-plan's ranks over the capacity swap too (else the switch turns it off)
            check_memory([chosen], {}, self.memory_model(), self.capacity_bytes(),
                         drop_unfit=False, swap=self.swap_pricing)
        decision = RecoveryDecision(
            generation=m.generation, chosen=chosen, policy=policy,
            horizon_s=self.recovery.horizon_s, members=m.members,
            committed_step=m.committed_step, agreed_at=m.decided_at, decided_at=time.time(),
            candidates=replan.rows(), interrupted=self._interrupted,
            swap_host_Bps=pricing.host_Bps if (pricing := self.swap_pricing) else None)
        self.store.set(contract.plan_key(m.generation), json.dumps(decision.to_dict()))
        return decision

    def _await_decision(self, m: Membership) -> RecoveryDecision:
        key = contract.plan_key(m.generation)
        self.monitor.watch(m.generation, m.members)
        while True:
            try:
                self.store.wait([key], _td(self.comm_cfg.poll_s))
                return RecoveryDecision.from_dict(json.loads(self.store.get(key)))
            except dist.DistStoreError:
                reason = self.monitor.abort_check()
                if reason:
                    raise StepAborted(f"while waiting for the recovery plan: {reason}") from None

    def _transition(self, m: Membership, decision: RecoveryDecision
                    ) -> tuple[Generation, int]:
        cand = decision.chosen
        held = self.engine.held
        wire = transport_device(self.comm_cfg.backend, self.engine.device)
        self.monitor.watch(m.generation, m.members)
        # pack what we send before the new plan reshapes our layers
        outgoing = {i: held.pack(t.layer, wire)
                    for i, t in enumerate(cand.transfers) if t.src == self.rank}
        extra = sorted({Channel(t.src, t.dst, "mig") for t in cand.transfers},
                       key=lambda c: (c.src, c.dst))
        gen = self._open(m.generation, cand.plan, extra,
                         two_phase=bool(cand.background_transfers))
        gen.decision = decision
        # a background copy ran on while the groups were built; it ends here
        copied, moved_behind = self._end_background(decision.policy == SWITCH,
                                                    m.committed_step)
        gen.timeline.update(copied)
        t_rebuilt = time.time()
        self.engine.set_swap_budget(cand.swap_budgets.get(self.rank))  # on, or off again
        self.engine.install(gen.program, gen.comm, gen.commit, keep=True)
        if self._before_migrate is not None:
            self._before_migrate(cand.resume_step)
        if cand.from_checkpoint:  # resume_step 0: no checkpoint, from initial weights
            step = cand.resume_step - 1
            self.engine.load_checkpoint(self.ckpt_dir, step if step >= 0 else None)
        else:
            self._migrate(gen.comm, cand.transfers, outgoing, wire)
        t_migrated = time.time()
        self._verify(gen, None if cand.from_checkpoint or self.recovery.verify == "all"
                     else {t.layer for t in [*cand.transfers, *moved_behind]})
        self.engine.prune()
        self._activate(gen)
        if cand.background_transfers:  # two-phase: the copies start from this state
            self._background = BackgroundCopy(
                self.comm_cfg, self.rank, cand.background_transfers, held, wire, self.engine.lr_at,
                self.recovery.background_Bps, cand.resume_step, self.store, gen.number)
            self.engine.on_committed(self._background.on_committed)
        gen.timeline.update(rebuilt=t_rebuilt, migrated=t_migrated, started=time.time())
        self.store.set(contract.started_key(gen.number, self.rank), json.dumps(gen.timeline))
        if self.rank == min(gen.members):
            self.say(f"generation {gen.number} ({cand.kind}): "
                     f"{[len(p.stages) for p in cand.plan.pipelines]} stages per pipeline, "
                     f"members {gen.members}, resuming at step {cand.resume_step}",
                     cand.resume_step)
        return gen, cand.resume_step

    def stop_background(self) -> None:
        """Training ended before a two-phase switch: stop its copies' threads."""
        self._end_background(False, -1)

    def _end_background(self, switch: bool, committed_step: int
                        ) -> tuple[dict, list[Transfer]]:
        """A transition ends the last generation's background copy: at a two-phase switch
        its copies are finished up to `committed_step` and taken into the held layers;
        after anything else (a failure first) they are abandoned. Returns the copy's
        wall times (this rank's) for the switch's timeline, and its transfers."""
        bg, self._background = self._background, None
        if bg is None:
            return {}, []
        self.engine.on_committed(None)
        if not switch:
            bg.abandon()
            return {}, []
        bg.finish(committed_step, self.comm_cfg.timeout_s, self.monitor.abort_check)
        return ({"background_started": bg.started, "background_copied": bg.copied_at,
                 "background_finished": time.time()}, bg.transfers)

    def _migrate(self, comm: Comm, moves: list[Transfer], outgoing: dict[int, torch.Tensor],
                 wire: torch.device) -> None:
        """Run the transfers round by round, as the transition is predicted
        (`planner.placement.transfer_rounds`: in one round a rank sends at most one layer
        and receives at most one, so no link carries two at once); `outgoing`: this rank's
        packed layers by transfer index."""
        held = self.engine.held
        for k in sorted({t.round for t in moves}):
            this = [(i, t) for i, t in enumerate(moves) if t.round == k]
            sends = [comm.send(outgoing[i], t.dst, "mig") for i, t in this
                     if t.src == self.rank]
            for _, t in this:
                if t.dst == self.rank:
                    buf = held.receive_buffer(t.layer, wire)
                    held.unpack(t.layer, comm.wait(comm.recv(buf, t.src, "mig")))
            for p in sends:
                comm.wait(p)

    def _verify(self, gen: Generation, layers: set[int] | None = None) -> None:
        """Every replica of every layer (of `layers`: those whose state moved, see
        `RecoveryConfig.verify`) must be bit-identical before training resumes."""
        if layers is not None and not layers:
            return  # nothing moved: the replicas are as the last check left them
        verdict = self.replicas.compare(gen.members, str(gen.number), layers)
        if verdict != "ok":
            raise RecoveryFailed(f"state check failed in generation {gen.number}: {verdict}")

    def check_replicas(self) -> bool:
        """End of training: are all replicas of every layer still bit-identical?"""
        g = self.current
        return self.replicas.compare(g.members, f"{g.number}/final") == "ok"


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)

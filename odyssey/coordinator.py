"""Generations and in-place recovery for one rank.

A generation is a member set with its plan, groups and commit protocol. On a
membership change the survivors: agree on the next generation (membership.py), the
leader scores every recovery candidate with the cost model and publishes its choice,
everyone builds the new groups, moves layer state from live replicas (or reloads the
checkpoint), checks replicas agree, and resumes at the step after the last committed
one with the same sample ids. A failure during any of this starts the next agreement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from odyssey import checkpoint as ckpt
from odyssey import contract
from odyssey.comm import Comm, CommConfig, CommError, StepAborted
from odyssey.commit import CommitProtocol
from odyssey.engine import Engine
from odyssey.membership import Membership, agree
from odyssey.migrate import layer_digest, pack_layer, packed_size, unpack_layer
from odyssey.monitor import FailureMonitor
from planner.plan import Plan
from planner.program import Channel, Program, compile_plan
from planner.recovery import (
    RecoveryCandidate,
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
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
    decision: dict | None = None
    """The leader's published recovery decision that created this generation."""


class Coordinator:
    """Owns this rank's generations; see the module docstring."""

    def __init__(self, store: dist.Store, rank: int, engine: Engine, monitor: FailureMonitor,
                 comm_cfg: CommConfig, recovery: RecoveryConfig, ckpt_dir,
                 predictor: Callable[[], Callable[[Plan], float]],
                 layer_bytes: Callable[[], list[float]],
                 say: Callable[..., None]):
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
        self.current: Generation | None = None
        self.trained_plan: Plan | None = None
        """Plan of the last generation that committed a step (what ranks really hold)."""
        self._graveyard: list[Comm] = []  # old groups: destroying them can block
        self._interrupted = 0
        self.before_migrate: Callable[[int], None] | None = None
        """Called with the resume step once the new groups exist (fault injection)."""

    # ---- generations ---------------------------------------------------------------
    def _open(self, number: int, plan: Plan, extra: list[Channel] | None = None) -> Generation:
        program = compile_plan(plan)
        abort = self.monitor.abort_check
        comm = Comm(self.store, self.rank, number, self.comm_cfg, abort).setup(program, extra)
        commit = CommitProtocol(self.store, number, plan.ranks, self.comm_cfg.poll_s, abort)
        return Generation(number, plan, program, comm, commit, plan.ranks)

    def begin(self, plan: Plan, number: int = 0) -> Generation:
        gen = self._open(number, plan)
        self.engine.install(gen.program, gen.comm, gen.commit)
        self._activate(gen)
        self.trained_plan = plan
        return gen

    def _activate(self, gen: Generation) -> None:
        if self.current is not None:
            self._graveyard.append(self.current.comm)
        self.current = gen
        self.monitor.watch(gen.number, gen.members)
        if self.rank == min(gen.members):
            self.store.set(contract.GENERATION, str(gen.number))

    def committed(self) -> None:
        """A step committed under the current generation."""
        self.trained_plan = self.current.plan

    # ---- recovery ------------------------------------------------------------------
    def recover(self, committed_step: int, reason: str, newcomer: bool = False
                ) -> tuple[Generation, int]:
        """Move to a new generation; return it and the first step to run."""
        previous = list(self.current.members) if self.current else []
        self._interrupted = 0
        number = self.current.number + 1 if self.current else int(
            self.store.get(contract.GENERATION)) + 1
        while True:
            t0 = time.time()
            m: Membership | None = None
            try:
                m = agree(self.store, self.monitor, number, self.rank, previous, committed_step)
                t_agreed = time.time()
                decision = self._decide(m) if self.rank == m.leader else self._await_decision(m)
                t_planned = time.time()
                gen, resume = self._transition(m, decision, committed_step)
                gen.timeline.update(agree_start=t0, agreed=t_agreed, planned=t_planned)
                return gen, resume
            except (StepAborted, CommError, TimeoutError) as e:
                self.say(f"recovery to generation {number} interrupted ({e}); agreeing again")
                self.monitor.publish("failure", f"during recovery: {e}", generation=number)
                if m is not None:
                    previous = m.members
                number += 1
                self._interrupted += 1

    def _decide(self, m: Membership) -> dict:
        ctx = RecoveryContext(self.trained_plan, m.members, m.committed_step,
                              self.layer_bytes(),
                              ckpt.latest_step(self.ckpt_dir, self.trained_plan.num_layers),
                              m.newcomers)
        predict = self.predictor()
        cands, dropped = build_candidates(ctx, predict)
        score(cands, ctx, self.recovery, predict)
        chosen = choose(cands, self.recovery)
        decision = {"chosen": chosen.to_dict(), "policy": self.recovery.policy,
                    "horizon_s": self.recovery.horizon_s,
                    "candidates": [c.row() for c in sorted(cands, key=lambda c: -c.score)],
                    "dropped": dropped, "membership": json.loads(m.to_json()),
                    "ranks_lost": sorted(set(self.trained_plan.ranks) - set(m.members)),
                    "interrupted": self._interrupted, "time": time.time()}
        self.store.set(contract.plan_key(m.generation), json.dumps(decision))
        return decision

    def _await_decision(self, m: Membership) -> dict:
        key = contract.plan_key(m.generation)
        self.monitor.watch(m.generation, m.members)
        while True:
            try:
                self.store.wait([key], _td(self.comm_cfg.poll_s))
                return json.loads(self.store.get(key))
            except dist.DistStoreError:
                reason = self.monitor.abort_check()
                if reason:
                    raise StepAborted(f"while waiting for the recovery plan: {reason}") from None

    def _transition(self, m: Membership, decision: dict, committed_step: int
                    ) -> tuple[Generation, int]:
        cand = RecoveryCandidate.from_dict(decision["chosen"])
        self.monitor.watch(m.generation, m.members)
        mine_out = [t for t in cand.transfers if t.src == self.rank]
        # pack what we send before the new plan reshapes our layers
        outgoing = [(t.layer, t.dst, pack_layer(self.engine.layers[t.layer],
                                                self.engine.optimizers[t.layer]))
                    for t in mine_out]
        extra = sorted({Channel(t.src, t.dst, "mig") for t in cand.transfers},
                       key=lambda c: (c.src, c.dst))
        gen = self._open(m.generation, cand.plan, extra)
        gen.decision = decision
        t_rebuilt = time.time()
        self.engine.install(gen.program, gen.comm, gen.commit, keep=True)
        if self.before_migrate is not None:
            self.before_migrate(cand.resume_step)
        sends = [gen.comm.send(flat, dst, "mig") for _, dst, flat in outgoing]
        if cand.from_checkpoint:
            self._reload(cand, gen)
        else:
            for t in sorted(cand.transfers, key=lambda t: (t.layer, t.src, t.dst)):
                if t.dst != self.rank:
                    continue
                layer = self.engine.layers[t.layer]
                buf = torch.empty(packed_size(layer))
                gen.comm.wait(gen.comm.recv(buf, t.src, "mig"))
                unpack_layer(buf, layer, self.engine.optimizers[t.layer])
        for p in sends:
            gen.comm.wait(p)
        t_migrated = time.time()
        self._verify(gen)
        self.engine.prune()
        self._activate(gen)
        gen.timeline.update(rebuilt=t_rebuilt, migrated=t_migrated, started=time.time())
        self.store.set(contract.started_key(gen.number, self.rank), json.dumps(gen.timeline))
        if self.rank == min(gen.members):
            self.say(f"generation {gen.number} ({cand.kind}): "
                     f"{[len(p.stages) for p in cand.plan.pipelines]} stages per pipeline, "
                     f"members {gen.members}, resuming at step {cand.resume_step}",
                     cand.resume_step)
        return gen, cand.resume_step

    def _reload(self, cand: RecoveryCandidate, gen: Generation) -> None:
        step = cand.resume_step - 1
        stage = cand.plan.stage(self.rank)
        for i in stage.layers:
            if step < 0:
                self.engine.reset_layer(i)
            else:
                self.engine.load_layer_state(i, ckpt.load_layer(self.ckpt_dir, step, i))

    def _verify(self, gen: Generation) -> None:
        """Every replica of every layer must be bit-identical before training resumes."""
        verdict = self._compare_digests(gen, str(gen.number))
        if verdict != "ok":
            raise RecoveryFailed(f"state check failed in generation {gen.number}: {verdict}")

    def check_replicas(self) -> bool:
        """End of training: are all replicas of every layer still bit-identical?"""
        return self._compare_digests(self.current, f"{self.current.number}/final") == "ok"

    def _compare_digests(self, gen: Generation, tag: str) -> str:
        stage = gen.plan.stage(self.rank)
        mine = {i: layer_digest(self.engine.layers[i]) for i in stage.layers}
        self.store.set(contract.checksum_key(tag, self.rank), json.dumps(mine))
        key = contract.verdict_key(tag)
        if self.rank == min(gen.members):
            raw = self._wait_all([contract.checksum_key(tag, r) for r in gen.members])
            digests: dict[int, set[str]] = {}
            for v in raw:
                for i, d in json.loads(v).items():
                    digests.setdefault(int(i), set()).add(d)
            bad = sorted(i for i, ds in digests.items() if len(ds) > 1)
            self.store.set(key, "ok" if not bad else f"replicas of layers {bad} differ")
        return self._wait_all([key])[0].decode()

    def _wait_all(self, wanted: list[str]) -> list[bytes]:
        while True:
            try:
                self.store.wait(wanted, _td(self.comm_cfg.poll_s))
                return self.store.multi_get(wanted)
            except dist.DistStoreError:
                reason = self.monitor.abort_check()
                if reason:
                    raise StepAborted(f"during the state check: {reason}") from None


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)

"""What each policy does when the cluster changes, for the trace simulator.

A policy gets the current plan and the new members and returns a `Reaction`: the plan
to run next, its samples per step, the stall it costs (transition) and whether work
since the last checkpoint is lost. The recovery policies (adaptive, reroute,
reparallelize, redundant) make the exact choice the live leader makes: candidates from
`planner.recovery.build_candidates` (screening pipeline counts at cluster scale),
scored and chosen by `planner.recovery.score` / `choose`. `restart` (torchrun +
checkpoints) and `drop-replica` (torchft) are modelled here. Around a straggler only
`adaptive` re-plans (`mitigate`: the live leader's `planner.mitigation`, dropping the
slow rank included, recovered with `build`, the same builder as its failures); the others
keep their plan through a slowdown, as the systems they model do.

With `MemoryLimits`, the candidates are checked against a device capacity by the same
call the live leader makes (`build_candidates(memory=, capacity_bytes=, drop_unfit=,
swap=)`): unfit ones are dropped with the same reasons, and a chosen plan that fits only
by swapping carries its `swap_s` into the step time the simulator charges after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from planner.closed_form import pipeline_s
from planner.cost import CostModel
from planner.memory import SwapPricing
from planner.mitigation import MitigationChoice, plan_mitigation
from planner.partition import Partitioner
from planner.plan import Pipeline, Plan, PlanError
from planner.recovery import (
    RecoveryCandidate,
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
    choose,
    score,
)
from planner.straggler import StragglerConfig

SIM_POLICIES = ("adaptive", "reroute", "reparallelize", "redundant", "restart", "drop-replica")


@dataclass
class Reaction:
    """A policy's answer to one membership change."""

    plan: Plan
    kind: str
    """What was done: reroute, redundant, reparallelize, restart, drop, heal, none."""
    transition_s: float
    """Time nobody trains (detection, agreement, rebuild, migration, restart)."""
    rollback: bool = False
    """Work since the last checkpoint is lost (restart)."""
    fallback: bool = False
    """A fixed policy could not do its kind; the best feasible candidate ran instead."""
    samples_per_step: int | None = None
    """Samples trained per step when it differs from the plan's global batch."""
    swap_s: float = 0.0
    """Step time swapping adds to `plan` (the chosen candidate's `swap_s`)."""
    swap_ranks: int = 0
    """Ranks that swap activations to fit `plan` (0: it fits, or nobody checked)."""
    memory_dropped: bool = False
    """Memory dropped some candidate (or none fitted) at this change."""
    memory_fallback: bool = False
    """A fixed policy's kind was dropped for memory, so the best candidate ran instead."""
    then: RecoveryCandidate | None = None
    """two-phase: the plan switched to `background_s` after the transition, unless
    another change comes first (the copy is then abandoned)."""
    background_s: float = 0.0
    """two-phase: how long the background copy runs (the candidate's prediction)."""
    switch_s: float = 0.0
    """two-phase: the switch's own stall (agreement and rebuild, nothing moves)."""


@dataclass(frozen=True)
class MemoryLimits:
    """The device capacity the recovery candidates are checked against (the simulator's
    counterpart of the live leader's `RecoveryConfig` memory fields)."""

    capacity_bytes: float
    """Per-rank capacity (device memory minus the reserve)."""
    aware: bool = True
    """Drop candidates over the capacity (`build_candidates(drop_unfit=)`); off: they
    are kept and may be chosen, as before memory was checked."""
    swap: SwapPricing | None = None
    """Price swapping for candidates over the capacity (only when `aware`)."""


@dataclass
class Costs:
    """Transition costs a policy charges (filled from the simulator's config)."""

    detect_s: float
    agree_s: float
    plan_s: float
    rebuild_s: float
    transfer_Bps: float
    restart_s: float
    heartbeat_timeout_s: float
    checkpoint_load_s: float

    @property
    def in_place_s(self) -> float:
        return self.detect_s + self.agree_s + self.plan_s + self.rebuild_s


class Policy:
    """Base: `react` to a membership change; `step_factor` of always-on overheads."""

    name = "base"

    def __init__(self, cost: CostModel, costs: Costs, layer_bytes: list[float],
                 predict: Callable[[Plan], float], predict_len: Callable[[int, int, int], float],
                 horizon_s: float, memory: MemoryLimits | None = None):
        self.cost, self.costs, self.layer_bytes = cost, costs, layer_bytes
        self.predict, self.predict_len, self.horizon_s = predict, predict_len, horizon_s
        self.memory = memory
        self._partitioners: dict[int, Partitioner] = {}
        self.two_phase = False  # whether two-phase candidates compete (Odyssey's policies)

    def step_factor(self, plan: Plan) -> float:
        return 1.0

    def react(self, plan: Plan, members: list[int], committed_step: int,
              checkpoint_step: int | None, lost: bool) -> Reaction:
        raise NotImplementedError

    # shared by the recovery-based policies
    def candidates(self, plan: Plan, members: list[int], committed_step: int,
                   checkpoint_step: int | None, policy: str
                   ) -> tuple[RecoveryCandidate, list[RecoveryCandidate], RecoveryConfig]:
        chosen, cands, rc, _ = self.decide(plan, members, committed_step, checkpoint_step,
                                           policy)
        return chosen, cands, rc

    def decide(self, plan: Plan, members: list[int], committed_step: int,
               checkpoint_step: int | None, policy: str
               ) -> tuple[RecoveryCandidate, list[RecoveryCandidate], RecoveryConfig,
                          dict[str, str]]:
        """The live leader's decision: candidates (checked against `self.memory` as the
        leader checks them), scores, choice; and why kinds or plans were dropped."""
        newcomers = [r for r in sorted(members) if not plan.has_rank(r)]
        ctx = RecoveryContext(plan, sorted(members), committed_step, list(self.layer_bytes),
                              checkpoint_step, newcomers)
        cands, dropped = self.build(ctx)
        rc = self.recovery_config(policy)
        score(cands, ctx, rc, self.predict)
        return choose(cands, rc), cands, rc, dropped

    def build(self, ctx: RecoveryContext
              ) -> tuple[list[RecoveryCandidate], dict[str, str]]:
        """Every feasible recovery for `ctx` (unscored) and why each other kind was
        dropped: `build_candidates` checked against `self.memory` as the live leader
        checks them (its `Coordinator.recovery_candidates`); what `decide` scores and a
        straggler drop recovers with."""
        mem = self.memory
        part = self._partitioner(ctx.old_plan.microbatch_size)
        if mem is None:
            return build_candidates(ctx, self.predict, predict_len=self.predict_len,
                                    partitioner=part, two_phase=self.two_phase)
        return build_candidates(ctx, self.predict, predict_len=self.predict_len,
                                memory=self.cost.memory, capacity_bytes=mem.capacity_bytes,
                                drop_unfit=mem.aware, swap=mem.swap if mem.aware else None,
                                partitioner=part, two_phase=self.two_phase)

    def _partitioner(self, mb: int) -> Partitioner:
        """The cost model's layer tables (the simulator's cost does not change: built
        once per microbatch size)."""
        if mb not in self._partitioners:
            self._partitioners[mb] = self.cost.partitioner(mb)
        return self._partitioners[mb]

    def recovery_config(self, policy: str) -> RecoveryConfig:
        """The live leader's scoring settings, from the simulator's transition costs."""
        return RecoveryConfig(policy=policy, horizon_s=self.horizon_s,
                              transfer_Bps=self.costs.transfer_Bps,
                              rebuild_s=self.costs.in_place_s - self.costs.detect_s,
                              checkpoint_load_Bps=sum(self.layer_bytes)
                              / max(self.costs.checkpoint_load_s, 1e-9))

    @property
    def mitigates(self) -> bool:
        """Whether this policy re-plans around stragglers (only Odyssey's does; the
        systems the others model keep their plan through a slowdown)."""
        return False

    def mitigate(self, plan: Plan, members: list[int], committed_step: int,
                 predict: Callable[[Plan], float], cfg: StragglerConfig,
                 cost: CostModel | None = None, home: Plan | None = None) -> MitigationChoice:
        """The live leader's mitigation (`planner.mitigation.plan_mitigation`): keep
        `plan`, re-deal its microbatches, (with `cost`) re-partition it or, with
        `cfg.drop`, drop the slow ranks (the survivors recover with what `decide` would
        choose for their failure, `build`) or, with `cfg.park`, park them (the survivors
        reroute; they rejoin once their slowdown ends); `predict` and `cost` know the
        stragglers,
        `home` is the plan before mitigation, `cfg` holds `min_gain` and `drop_gain`."""
        ctx = RecoveryContext(plan, sorted(members), committed_step, list(self.layer_bytes))
        # as live: the leader (the lowest rank) is never parked
        parkable = ([r for r in members if r != min(members) and cost is not None
                     and cost.speed_factor(r) > 1] if cfg.park else [])
        recover = (lambda without: self.build(without)[0]) if cfg.drop or parkable else None
        # re-partitions stay within the capacity, as live (memory-aware or not)
        limit = self.memory.capacity_bytes if self.memory is not None else math.inf
        return plan_mitigation(ctx, predict, self.recovery_config("adaptive"), cfg.min_gain,
                               cost=cost, home=home, memory_limit=limit, recover=recover,
                               drop_gain=cfg.drop_gain, can_drop=cfg.drop,
                               parkable=parkable)


class RecoveryPolicy(Policy):
    """adaptive, or a fixed kind; exactly the live leader's choice."""

    def __init__(self, kind: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = self.name = kind
        self.two_phase = kind in ("adaptive", "two-phase")

    @property
    def mitigates(self) -> bool:
        return self.kind == "adaptive"

    def transition_s(self, c: RecoveryCandidate) -> float:
        """Agreement + planning + rebuild + migration (a newcomer announces itself, so
        detection is charged by `react` for losses only)."""
        if c.from_checkpoint:  # in place: processes live, state reloaded, work redone
            return self.costs.in_place_s - self.costs.detect_s + self.costs.checkpoint_load_s
        return c.predicted_transition_s  # score's: agree + plan + rebuild + migration

    def react(self, plan, members, committed_step, checkpoint_step, lost):
        chosen, _, rc, dropped = self.decide(plan, members, committed_step, checkpoint_step,
                                             self.kind)
        fallback = self.kind != "adaptive" and chosen.kind != self.kind
        detect = self.costs.detect_s if lost else 0.0
        for_memory = {k for k, why in dropped.items() if memory_reason(k, why)}
        return Reaction(chosen.plan, chosen.kind, detect + self.transition_s(chosen),
                        rollback=chosen.from_checkpoint, fallback=fallback,
                        swap_s=chosen.swap_s, swap_ranks=len(chosen.swap_budgets),
                        memory_dropped=bool(for_memory),
                        memory_fallback=fallback and self.kind in for_memory,
                        then=chosen.then, background_s=chosen.background_s,
                        switch_s=rc.switch_s)


class BubbleFillReroute(RecoveryPolicy):
    """ReCycle with bubble filling: a shared stage's extra microbatches run in its
    pipeline's warm-up/cool-down bubbles, so a rerouted plan costs at most the bubble
    more than the plan it came from."""

    def __init__(self, *args, **kwargs):
        super().__init__("reroute", *args, **kwargs)
        self.name = "reroute+bf"
        self.base_step: dict[int, tuple[Plan, float]] = {}  # id -> (plan kept alive, s)

    def react(self, plan, members, committed_step, checkpoint_step, lost):
        r = super().react(plan, members, committed_step, checkpoint_step, lost)
        self.base_step[id(r.plan)] = (r.plan, self.predict(plan) * self.step_factor(plan))
        return r

    def step_factor(self, plan: Plan) -> float:
        hit = self.base_step.get(id(plan))
        if not plan.has_shared_stages or hit is None or hit[0] is not plan:
            return 1.0
        raw = self.predict(plan)
        mb = plan.microbatch_size
        bubble = max((len(p.stages) - 1) * max(
            self.cost.forward_s(s.start, s.end, mb) + self.cost.backward_s(s.start, s.end, mb)
            for s in p.stages) for p in plan.pipelines)
        return max(self.base_step[id(plan)][1], raw - bubble) / raw


class RedundantPolicy(RecoveryPolicy):
    """Bamboo: every stage also runs its successor's forward (eager redundant compute)
    and holds its layers as a shadow copy, so a loss needs no migration."""

    def __init__(self, *args, **kwargs):
        super().__init__("redundant", *args, **kwargs)
        self._factor: dict[int, tuple[Plan, float]] = {}  # id -> (plan kept alive, x)

    def step_factor(self, plan: Plan) -> float:
        key = id(plan)
        if key not in self._factor or self._factor[key][0] is not plan:
            mb, worst_plain, worst_rc = plan.microbatch_size, 0.0, 0.0
            for p in plan.pipelines:
                fwd = [self.cost.forward_s(s.start, s.end, mb) for s in p.stages]
                bwd = [self.cost.backward_s(s.start, s.end, mb) for s in p.stages]
                rc = [f + fwd[(i + 1) % len(fwd)] if len(fwd) > 1 else f
                      for i, f in enumerate(fwd)]
                m = len(p.microbatches)
                worst_plain = max(worst_plain, pipeline_s(plan.schedule, fwd, bwd, m))
                worst_rc = max(worst_rc, pipeline_s(plan.schedule, rc, bwd, m))
            step = self.predict(plan)
            self._factor[key] = (plan, (step + worst_rc - worst_plain) / step)
        return self._factor[key][1]

    def shadow_bytes(self, plan: Plan) -> float:
        """Largest extra state a rank holds for its successor's shadow copy."""
        out = 0.0
        for p in plan.pipelines:
            for i in range(len(p.stages)):
                nxt = p.stages[(i + 1) % len(p.stages)]
                out = max(out, sum(self.layer_bytes[nxt.start:nxt.end]))
        return out

    def transition_s(self, c: RecoveryCandidate) -> float:
        if c.kind == "redundant":  # shadow copy present: no migration
            return self.costs.in_place_s - self.costs.detect_s
        return super().transition_s(c)


class RestartPolicy(Policy):
    """torchrun (elastic) + checkpoints: any membership change kills every worker; the
    job restarts on the live nodes with the best fresh plan and reloads the checkpoint."""

    name = "restart"

    def react(self, plan, members, committed_step, checkpoint_step, lost):
        chosen, _, _, dropped = self.decide(plan, members, committed_step, checkpoint_step,
                                            "restart")
        c = self.costs
        detect = c.detect_s if lost else 0.0
        fallback = chosen.kind != "restart"
        for_memory = {k for k, why in dropped.items() if memory_reason(k, why)}
        return Reaction(chosen.plan, "restart", detect + c.restart_s + c.checkpoint_load_s,
                        rollback=True, fallback=fallback,
                        swap_s=chosen.swap_s, swap_ranks=len(chosen.swap_budgets),
                        memory_dropped=bool(for_memory),
                        memory_fallback=fallback and "restart" in for_memory)


class DropReplicaPolicy(Policy):
    """torchft: a replica group (pipeline) that loses a rank drops out, with its
    samples; it rejoins, with its original stages on free ranks, when enough come back.
    All replicas lost: restart from the checkpoint."""

    name = "drop-replica"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.original: list[Pipeline] | None = None
        self.batch_of: dict[int, int] = {}

    def react(self, plan, members, committed_step, checkpoint_step, lost):
        mset = set(members)
        orig = self.original
        live = [p for p in plan.pipelines if all(r in mset for r in p.ranks)]
        if lost:
            kind, stall = "drop", self.costs.heartbeat_timeout_s + self.costs.rebuild_s
        else:
            kind, stall = "heal", self.costs.rebuild_s
        used = {r for p in live for r in p.ranks}
        free = sorted(mset - used)
        live_mbs = {m for p in live for m in p.microbatches}
        for p in orig:  # heal: a missing replica re-forms on free ranks
            if set(p.microbatches) & live_mbs or len(free) < len(p.stages):
                continue
            ranks, free = free[:len(p.stages)], free[len(p.stages):]
            live.append(Pipeline([replace(s, rank=r) for s, r in zip(p.stages, ranks)],
                                 list(p.microbatches)))
            live_mbs |= set(p.microbatches)
            stall += max(sum(self.layer_bytes[s.start:s.end]) for s in p.stages) \
                / self.costs.transfer_Bps
        if not live:  # every replica group lost: torchft cannot continue in place
            chosen, _, _ = self.candidates(plan, members, committed_step, checkpoint_step,
                                           "restart")
            c = self.costs
            return Reaction(chosen.plan, "restart", c.detect_s + c.restart_s
                            + c.checkpoint_load_s, rollback=True, swap_s=chosen.swap_s,
                            swap_ranks=len(chosen.swap_budgets))
        return self._reaction(plan, live, kind, stall)

    def _reaction(self, plan: Plan, live: list[Pipeline], kind: str, stall: float
                  ) -> Reaction:
        # renumber the surviving microbatches so the plan validates; remember the batch
        count, pipes = 0, []
        for p in sorted(live, key=lambda p: min(p.microbatches)):
            n = len(p.microbatches)
            pipes.append(Pipeline(list(p.stages), list(range(count, count + n))))
            count += n
        new = Plan(plan.num_layers, count, plan.microbatch_size, pipes,
                   plan.schedule).validate()
        # the original ids are what heals compare against
        for p, q in zip(pipes, sorted(live, key=lambda p: min(p.microbatches))):
            p.microbatches = list(q.microbatches)
        new.num_microbatches = self.full_mbs
        return Reaction(new, kind, stall, samples_per_step=count * plan.microbatch_size)

    def start(self, plan: Plan) -> None:
        self.original = [Pipeline(list(p.stages), list(p.microbatches))
                         for p in plan.pipelines]
        self.full_mbs = plan.num_microbatches


def memory_reason(key: str, reason: str) -> bool:
    """Whether a `build_candidates` drop entry is a memory check's (`check_memory`)."""
    return key == "memory" or "> device memory" in reason


def make_policy(name: str, *args, **kwargs) -> Policy:
    """The policy object for a name in SIM_POLICIES (plus 'reroute+bf', 'two-phase' and
    'adaptive-one-phase')."""
    if name in ("adaptive", "reroute", "reparallelize", "two-phase"):
        return RecoveryPolicy(name, *args, **kwargs)
    if name == "adaptive-one-phase":  # adaptive as before two-phase candidates
        pol = RecoveryPolicy("adaptive", *args, **kwargs)
        pol.name, pol.two_phase = name, False
        return pol
    table = {"redundant": RedundantPolicy, "restart": RestartPolicy,
             "drop-replica": DropReplicaPolicy, "reroute+bf": BubbleFillReroute}
    if name not in table:
        raise PlanError(f"unknown policy {name!r}; expected one of "
                        f"{(*SIM_POLICIES, 'reroute+bf', 'two-phase', 'adaptive-one-phase')}")
    return table[name](*args, **kwargs)

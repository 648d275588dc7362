"""Trace-driven cluster simulator: what each recovery policy trains over days of failures.

The cluster is `num_nodes x gpus_per_node` GPU slots grouped into failure domains of
`trace_node_gpus` (one trace node each; a trace node that arrives when every domain is
taken waits as a spare; `planner.cluster.membership`). Events at one instant form one
membership change. For every policy the loop alternates:

1. run the current plan at its predicted step time (closed form by default, cached per
   plan; `predictor='event'` uses the event simulator, as the live leader does) until
   the next event, writing a checkpoint (blocking, `checkpoint_write_s`) every
   `checkpoint_interval_s` of training (Young/Daly by default);
2. at a loss, abort the step in flight (its work is lost); at an arrival, wait for the
   step boundary; ask the policy (`planner.cluster.policies`) for the next plan and its
   transition; charge the stall, and for a restart roll back to the checkpoint.

Fail-slow events scale the compute of the slow node's ranks (`Predictor.slowed`). The
other policies keep their plan through them (none of the modelled systems re-plans for
a straggler); the adaptive one, with `SimConfig.mitigate_stragglers`, re-plans as the
live leader does (`planner.cluster.slow`): the live detector
(`planner.straggler.StragglerDetector`), fed the timings the simulated steps would
report from the slowdown on, says after how many steps (at the slowed step time) the
leader knows; then `planner.mitigation.plan_mitigation`, predicting with the found
factors in the cost model, picks the plan (its predicted transition is a stall), and
the same happens when the detector clears the straggler (the way back). With
`straggler.drop` it may also drop the slow ranks, as under `odyssey run`: they leave the
job for good (out of the membership while their nodes stay up; a replacement after the
node's removal is a fresh rank) and the survivors run the recovery their failure would
get. A loss or
arrival meanwhile gets the policy's usual recovery, then mitigation again if a known
straggler is still in the job. Results count the time slowed, mitigations (drops
among them), re-plans back and each episode's detection delay.

With a device memory (`SimConfig.device_memory`), the recovery policies check their
candidates against it exactly as the live leader does (`planner.cluster.policies.
MemoryLimits`); a plan chosen with swapping runs at its step time plus its `swap_s`, and
every plan a policy runs is checked by the memory model (`planner.memory.peak_memory`):
one over the capacity without swapping would OOM on a real cluster, and is counted in
the result (`over_budget`, its hours and GPU-hours), not silently accepted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from planner.cluster.control_plane import model_for
from planner.cluster.membership import ClusterConfig, Membership
from planner.cluster.policies import (
    Costs,
    DropReplicaPolicy,
    Policy,
    Reaction,
    RedundantPolicy,
    make_policy,
)
from planner.cluster.predict import Predictor, layer_state_bytes
from planner.cluster.results import PolicyResult, Segment
from planner.cluster.sim_config import SimConfig, TransitionConfig
from planner.cluster.slow import SlowWatch
from planner.cluster.traces import TraceError, TraceEvent, mean_gap_s
from planner.cost import CostModel
from planner.memory import peak_memory
from planner.plan import Pipeline, Plan, PlanError
from planner.recovery import SWITCH_STEPS


def simulate_trace(policy_name: str, initial_plan: Plan, cost: CostModel,
                   events: list[TraceEvent], cluster: ClusterConfig,
                   transitions: TransitionConfig | None = None,
                   config: SimConfig | None = None, target_samples: float | None = None,
                   ff_samples_per_s: float | None = None,
                   ff_for: Callable[[list[int]], float] | None = None,
                   memory_limit_bytes: float = math.inf,
                   predictor: Predictor | None = None) -> PolicyResult:
    """Replay `events` (which must add the initial nodes at t=0) for one policy.

    `ff_samples_per_s`: failure-free throughput of the whole cluster, the reference of
    goodput and of the post-recovery ratio (default: the initial plan's, and the ranks
    up at t=0 as the whole cluster). `ff_for(members)`: failure-free throughput of the
    best plan for those ranks, the post-recovery reference (default: `ff_samples_per_s`
    scaled by the live share of the cluster). `target_samples`: for time-to-N (default:
    half of what failure-free training does in the duration). `memory_limit_bytes`:
    above `exact_upto` ranks, fresh plans whose stages do not fit are not built.
    `predictor`: a `Predictor` to share (and its cache) across policies; it must have been
    built with this cost model, `config.predictor`, `config.step_factor` and limit.
    `config.device_memory` (with its reserve, awareness and swap fields) checks every
    plan's memory: see the module docstring."""
    tc, sc = transitions or TransitionConfig(), config or SimConfig()
    if not events:
        raise TraceError("empty trace: it must at least add the initial nodes at t=0")
    mship = Membership(cluster)
    start = [e for e in events if e.time_s <= 0]
    for e in start:
        mship.apply(e)
    members = mship.members()
    if sorted(initial_plan.ranks) != members:
        raise PlanError(f"the initial plan's ranks {initial_plan.ranks[:8]}.. are not the "
                        f"{len(members)} ranks up at t=0 {members[:8]}..")
    rest = [e for e in events if e.time_s > 0]
    duration = sc.duration_s or max(3600.0, max((e.time_s for e in rest), default=0.0))
    gap = mean_gap_s(events) or duration
    horizon = sc.horizon_s or gap
    lbytes = layer_state_bytes(cost)
    state_bytes = sum(lbytes)
    write_s = state_bytes / tc.checkpoint_write_Bps
    interval = tc.checkpoint_interval_s or math.sqrt(2 * write_s * gap)
    plane = model_for(tc.control_plane)
    grow = (plane.extra_s(len(members), cluster.gpus_per_node) if plane is not None
            else (0.0, 0.0, 0.0))
    costs = Costs(tc.detect_s + grow[0], tc.agree_s + grow[1], tc.plan_s,
                  tc.rebuild_s + grow[2], tc.transfer_Bps, tc.restart_s,
                  tc.heartbeat_timeout_s, state_bytes / tc.checkpoint_load_Bps)
    predict = predictor or Predictor(cost, sc.predictor, sc.step_factor, memory_limit_bytes)
    pol: Policy = make_policy(policy_name, cost, costs, lbytes, predict, predict.by_length,
                              horizon, memory=sc.memory_limits())
    if isinstance(pol, DropReplicaPolicy):
        pol.start(initial_plan)
    run = _Run(pol, predict, initial_plan, mship, rest, duration, interval, write_s,
               horizon, cluster, sc, target_samples, ff_samples_per_s, ff_for)
    if isinstance(pol, RedundantPolicy):
        run.res.notes.append(f"shadow copy: up to {pol.shadow_bytes(initial_plan) / 2**30:.1f}"
                             " GiB more state per rank")
    return run.go()


class _Run:
    """The event loop of one policy (see the module docstring)."""

    def __init__(self, pol, predict, plan, mship, events, duration, interval, write_s,
                 horizon, cluster, sc, target, ff=None, ff_for=None):
        self.pol, self.predict, self.mship, self.events = pol, predict, mship, events
        self.duration, self.interval, self.write_s = duration, interval, write_s
        self.cluster, self.sc = cluster, sc
        self.plan, self.batch = plan, plan.global_batch
        self.t = 0.0
        self.samples = 0.0
        self.steps = 0
        self.ckpt = (0, 0.0, 0.0)  # (step, samples, training time since) at last ckpt
        self.since_ckpt = 0.0
        self.slow: dict[int, float] = {}
        self.dropped: set[int] = set()
        """Ranks a straggler drop took out of the job (their nodes still up): out of the
        membership until their node is removed (a replacement in the slot is fresh)."""
        self.parked: set[int] = set()
        """Ranks a straggler park took out of the plan (in the job, probing): back once a
        probe finds their slowdown over (`StragglerConfig.probe_every_s` x the probes the
        detector needs to clear them)."""
        self.initial_live = cluster.world_size if ff else len(plan.ranks)
        self.ff_for = ff_for
        self.ref = 0.0
        self.ff = ff or plan.global_batch / (predict(plan) * pol.step_factor(plan))
        self.target = target if target is not None else self.ff * duration * 0.5
        self.res = PolicyResult(pol.name, duration, 0.0, 0, 0, {}, 0, 0.0, 0.0, 0.0, 0.0,
                                self.ff, None, None, self.target)
        self.horizon = horizon
        self.changed = False
        self.idle = False
        self.post_num = 0.0
        self.post_den = 0.0
        self.swap_s = 0.0  # step time the current plan's swapping adds
        self.switch: tuple[float, Reaction] | None = None  # two-phase: (due, reaction)
        self.capacity = sc.capacity_bytes()
        self.res.capacity_bytes = self.capacity
        self.over = self.check_memory(plan, 0)
        # the leader's view of stragglers, for the policy that re-plans around them
        self.watch = (SlowWatch(sc.straggler, predict)
                      if sc.mitigate_stragglers and pol.mitigates else None)

    def members(self) -> list[int]:
        """The job's ranks: the trace's live ones but the dropped and parked stragglers."""
        return [r for r in self.mship.members()
                if r not in self.dropped and r not in self.parked]

    def check_memory(self, plan: Plan, swap_ranks: int) -> bool:
        """Whether `plan` runs over the device capacity without swapping (counted)."""
        if self.capacity == math.inf:
            return False
        peak = peak_memory(plan, self.pol.cost.memory).max_bytes
        self.res.peak_bytes = max(self.res.peak_bytes, peak)
        over = peak > self.capacity and swap_ranks == 0
        self.res.over_budget += int(over)
        return over

    def step_s(self) -> float:
        base = (self.predict.slowed(self.plan, self.slow) if self.slow
                else self.predict(self.plan))
        return base * self.pol.step_factor(self.plan) + self.swap_s

    def seg(self, t0: float, t1: float, rate: float, what: str) -> None:
        if t1 <= t0:
            return
        if self.sc.timeline:
            segs = self.res.segments
            if segs and segs[-1].samples_per_s == rate and segs[-1].what == what \
                    and abs(segs[-1].t1 - t0) < 1e-9:
                segs[-1].t1 = t1
            else:
                segs.append(Segment(t0, t1, rate, what))
        if self.slow and what == "train" and any(self.plan.has_rank(r) for r in self.slow):
            self.res.slowed_s += t1 - t0
        if self.over and what == "train":
            self.res.over_budget_s += t1 - t0
            self.res.over_budget_gpu_h += (t1 - t0) * self.plan.world_size / 3600
        if self.changed and what == "train":
            ref = self.ref
            self.post_num += (rate / ref if ref > 0 else 0.0) * (t1 - t0)
            self.post_den += t1 - t0

    def train_until(self, t_end: float, finish: bool) -> float:
        """Run whole steps until `t_end`. The step in flight at `t_end` is completed when
        `finish` (an arrival or a slowdown waits for the step boundary), else aborted:
        its time is returned as lost work."""
        t_end = min(t_end, self.duration)
        if self.idle:
            self.seg(self.t, t_end, 0.0, "idle")
            self.t = max(self.t, t_end)
            return 0.0
        step = self.step_s()
        while self.t < t_end - 1e-12:
            until_ckpt = max(self.interval - self.since_ckpt, 0.0)
            n_ckpt = max(math.ceil(until_ckpt / step - 1e-9), 1)
            n_end = int((t_end - self.t) / step + 1e-9)
            n = min(n_end, n_ckpt)
            if n > 0:
                t1 = self.t + n * step
                self.seg(self.t, t1, self.batch / step, "train")
                self._progress(n, t1)
                self.since_ckpt += n * step
                self.t = t1
                if self.since_ckpt >= self.interval - 1e-9:  # checkpoint at this boundary
                    t1 = min(self.t + self.write_s, self.duration)
                    self.seg(self.t, t1, 0.0, "checkpoint")
                    self.res.checkpoint_s += t1 - self.t
                    self.t = t1
                    self.ckpt = (self.steps, self.samples, 0.0)
                    self.since_ckpt = 0.0
                    continue
            if n == n_end:
                partial = max(t_end - self.t, 0.0)
                if partial <= 1e-12:
                    return 0.0
                if finish:  # complete the step in flight, then react
                    self.seg(self.t, self.t + step, self.batch / step, "train")
                    self._progress(1, self.t + step)
                    self.since_ckpt += step
                    self.t += step
                    return 0.0
                self.seg(self.t, t_end, 0.0, "aborted")
                self.t = t_end
                return partial
        return 0.0

    def _progress(self, n: int, t1: float) -> None:
        before = self.samples
        self.samples += n * self.batch
        self.steps += n
        self.res.swap_time_s += n * self.swap_s
        full = self.plan.num_microbatches * self.plan.microbatch_size
        if isinstance(self.pol, DropReplicaPolicy) and self.batch < full:
            self.res.samples_dropped += n * (full - self.batch)
        if self.res.time_to_target_s is None and self.samples >= self.target:
            frac = (self.target - before) / (self.samples - before)
            self.res.time_to_target_s = t1 - n * self.step_s() * (1 - frac)

    def go(self) -> PolicyResult:
        t0 = time.perf_counter()
        i, evs = 0, list(self.events)  # parked ranks' returns are inserted
        while i < len(evs) and self.t < self.duration:
            at = evs[i].time_s
            if self.detected_before(at) or self.switched_before(at):
                continue
            batch = []
            while i < len(evs) and evs[i].time_s == at:
                batch.append(evs[i])
                i += 1
            if at >= self.duration:
                break
            before = set(self.members())
            slow_now: list[tuple[list[int], float]] = []  # applied once time reaches `at`
            for e in batch:
                if e.kind == "remove":  # a replacement in that slot is not slow, not dropped
                    gone = self.mship.ranks_of_node(e.node)
                    slow_now.append((gone, 1.0))
                    self.dropped.difference_update(gone)
                    self.parked.difference_update(gone)
                if e.kind == "rejoin":  # a parked rank's probe cleared it (if still slow: not)
                    back = self.mship.ranks_of_node(e.node)
                    self.parked.difference_update(r for r in back if r not in self.slow)
                elif e.kind == "slow":
                    ranks = self.mship.ranks_of_node(e.node)
                    slow_now.append((ranks, e.factor))
                    if e.factor <= 1 and self.parked & set(ranks):
                        self.probe_back(evs, i, at, e.node)
                else:
                    self.mship.apply(e)
            after = self.members()
            lost = bool(before - set(after))
            changed = set(after) != before
            # a slowdown (or a spare) only changes the step time after the step in flight
            self.res.lost_work_s += self.train_until(at, finish=not lost)
            for ranks, factor in slow_now:
                for r in ranks:
                    if factor > 1:
                        self.slow[r] = factor
                    else:
                        self.slow.pop(r, None)
            if not changed:
                self.rewatch()
                continue
            if not after:
                self.res.notes.append(f"t={at:.0f}s: no GPU left; idle until one returns")
                self.res.events.append((at, "all lost"))
                self.idle = True
                # every holder is gone: the returning ranks reuse the ids, so the old plan
                # is renamed to ids nobody has (only a restart from the checkpoint remains)
                ghost = 1 + max(self.plan.ranks) + self.cluster.world_size
                self.plan = Plan(self.plan.num_layers, self.plan.num_microbatches,
                                 self.plan.microbatch_size,
                                 [Pipeline([replace(st, rank=st.rank + ghost) for st in p.stages],
                                           list(p.microbatches)) for p in self.plan.pipelines],
                                 self.plan.schedule)
                continue
            self.react(after, lost or self.idle, at)
            self.idle = False
            if self.watch is not None:
                self.watch.forget(after)
                if self.watch.known:  # a straggler is still there: re-plan around it
                    self.mitigate()
                self.rewatch()
        while (self.detected_before(self.duration)  # detections after the last event
               or self.switched_before(self.duration)):
            continue
        if self.t < self.duration:
            self.train_until(self.duration, finish=False)
        self.res.samples, self.res.steps = self.samples, self.steps
        if self.post_den > 0:
            self.res.post_recovery_ratio = self.post_num / self.post_den
        r = self.res
        if r.detection_delay_s or r.mitigations:
            found = r.detection_delay_s
            mean = f"{sum(found) / len(found):.1f}" if found else "-"
            r.notes.append(f"stragglers: {len(found)} found (after {mean} s on average), "
                           f"{r.mitigations} mitigations ({r.drops} drops), "
                           f"{r.replans_back} re-plans back")
        if self.res.over_budget:
            self.res.notes.append(
                f"ran over budget: would OOM ({self.res.over_budget} plans over "
                f"{self.capacity / 2**30:.1f} GiB per GPU, {self.res.over_budget_s / 3600:.2f}"
                f" h, {self.res.over_budget_gpu_h:.0f} GPU-h)")
        self.res.notes.append(f"simulated in {time.perf_counter() - t0:.2f} s, "
                              f"horizon {self.horizon:.0f} s, checkpoint every "
                              f"{self.interval:.0f} s ({self.write_s:.1f} s each)")
        return self.res

    def react(self, members: list[int], lost: bool, at: float) -> None:
        self.switch = None  # a two-phase copy still running is abandoned
        r = self.pol.react(self.plan, members, self.steps, self.ckpt[0], lost)
        self.res.transitions += 1
        self.res.kinds[r.kind] = self.res.kinds.get(r.kind, 0) + 1
        self.res.fallbacks += int(r.fallback)
        self.res.events.append((at, f"{'-' if lost else '+'}{r.kind} {_shape(r.plan)}"))
        if r.rollback:
            step, samples, _ = self.ckpt
            self.res.lost_work_s += self.since_ckpt
            self.samples, self.steps = samples, step
            self.since_ckpt = 0.0
        self.stall(r.transition_s, r.kind)
        self.adopt(r.plan, r.samples_per_step or r.plan.global_batch, r.swap_s, r.swap_ranks)
        if r.then is not None:  # the switch: the copy's end and SWITCH_STEPS steps on
            self.switch = (self.t + r.background_s + SWITCH_STEPS * self.step_s(), r)
        self.res.memory_dropped += int(r.memory_dropped)
        self.res.memory_fallbacks += int(r.memory_fallback)
        self.changed = True
        self.ref = (self.ff_for(members) if self.ff_for
                    else self.ff * len(members) / self.initial_live)

    def switched_before(self, t: float) -> bool:
        """Train until a two-phase switch due before `t` and make it; whether one was.
        It is due `SWITCH_STEPS` phase-one steps after the copy ends (set by `react`)
        and stalls for its own cost, as `planner.recovery.two_phase` scores it."""
        if self.switch is None or self.switch[0] >= min(t, self.duration) or self.idle:
            return False
        (due, r), self.switch = self.switch, None
        self.train_until(due, finish=True)
        then = r.then
        self.stall(r.switch_s, "switch")
        self.res.kinds["switch"] = self.res.kinds.get("switch", 0) + 1
        self.res.events.append((self.t, f"=switch {then.kind} {_shape(then.plan)}"))
        self.adopt(then.plan, then.plan.global_batch, then.swap_s, len(then.swap_budgets))
        self.rewatch()
        return True

    def stall(self, seconds: float, kind: str) -> float:
        """Nobody trains for `seconds` (cut at the end): a transition of `kind`."""
        stall = min(seconds, max(self.duration - self.t, 0.0))
        self.seg(self.t, self.t + stall, 0.0, f"transition:{kind}")
        self.res.stall_s += stall
        self.t += stall
        return stall

    def adopt(self, plan: Plan, batch: int, swap_s: float, swap_ranks: int) -> None:
        """Run `plan` from now on: `batch` samples a step, `swap_s` more a step for the
        `swap_ranks` ranks that swap to fit (its memory checked)."""
        self.plan, self.batch, self.swap_s = plan, batch, swap_s
        self.res.swapping += int(swap_ranks > 0)
        self.over = self.check_memory(plan, swap_ranks)

    # ---- stragglers (the adaptive policy with SimConfig.mitigate_stragglers) ----------
    def rewatch(self) -> None:
        """The truth or the plan changed: when will the leader's detector notice."""
        if self.watch is not None and not self.idle:
            self.watch.rewatch(self.plan, self.slow, self.t, self.step_s())

    def detected_before(self, t: float) -> bool:
        """Train until a detection due before `t` and act on it; whether one was."""
        w = self.watch
        if w is None or w.pending is None or w.pending.time_s >= min(t, self.duration):
            return False
        p, w.pending = w.pending, None
        if self.idle:  # every rank was lost meanwhile: nothing left to detect
            return False
        self.train_until(p.time_s, finish=True)
        if p.stragglers.keys() - w.known.keys():
            self.res.detection_delay_s.append(p.delay_s)
        if w.known.keys() - p.stragglers.keys():
            self.res.clear_delay_s.append(p.delay_s)
        w.known = p.stragglers
        self.mitigate()
        self.rewatch()
        return True

    def probe_back(self, evs: list[TraceEvent], i: int, at: float, node: str) -> None:
        """A parked node's slowdown ended at `at`: its probes clear it once most of their
        window is fast (the window's median: half of it, and the next probe); it
        rejoins."""
        cfg = self.sc.straggler
        due = at + (cfg.window // 2 + 1) * cfg.probe_every_s
        k = i
        while k < len(evs) and evs[k].time_s <= due:
            k += 1
        evs.insert(k, TraceEvent(due, "rejoin", node))

    def mitigate(self) -> None:
        """The live leader's mitigation for the stragglers it knows (or the way back).
        A drop takes the slow ranks out of the job (they stay out while their nodes are
        up) and runs the recovery their failure would choose, its stall priced with the
        aborted step in flight; the other kinds re-plan in place."""
        w = self.watch
        predict = w.predictor()
        choice = self.pol.mitigate(self.plan, self.members(), self.steps, predict,
                                   self.sc.straggler, cost=predict.cost, home=w.home)
        if not choice.switch:
            return
        c = choice.chosen
        self.switch = None  # a re-plan ends a two-phase copy too
        self.res.mitigation_stall_s += self.stall(c.predicted_transition_s, c.kind)
        if w.known:
            self.res.mitigations += 1
        else:
            self.res.replans_back += 1
        self.res.events.append((self.t, f"~{c.kind} {c.note}"))
        if c.kind in ("drop", "park"):
            if c.kind == "drop":
                self.res.drops += 1
                self.dropped |= set(choice.leaving)
            else:
                self.parked |= set(choice.leaving)
            w.forget(self.members())
            self.adopt(c.plan, c.plan.global_batch, c.swap_s, len(c.swap_budgets))
            return
        w.switched(self.plan)
        # in place: the candidates are not priced for swapping; the plan's stays
        self.adopt(c.plan, c.plan.global_batch, self.swap_s, 0)


def _shape(plan: Plan) -> str:
    """Stages per pipeline, for an event line (a count past 8 pipelines)."""
    pipes = [len(p.stages) for p in plan.pipelines]
    return f"{pipes}" if len(pipes) <= 8 else f"{len(pipes)} pipelines"

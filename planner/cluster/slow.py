"""Fail-slow in the cluster simulator: the live detector finds it, the live planner acts.

A trace's `slow` lines set how many times slower a node's ranks compute (the truth).
What the simulated leader *knows* is what `planner.straggler.StragglerDetector` (the
class the live leader runs) concludes from the per-step timings the ranks would report
in their commit votes: `stage_timings` builds them from the cost model (per layer and
microbatch forward/backward seconds of each rank's stage, times its true factor).

`detect` runs that detector from a change of the truth: it starts, as the live leader's
does at a generation change, knowing the stragglers the leader knew (`known`), is warmed
with two windows at those speeds (a rank without replicas, e.g. one whose layers a
re-partition moved, measures its baseline there at its known factor), then is fed the
steps after the change one by one until the detector's straggler set changes (at most
`MAX_WINDOWS` windows: a slowdown under the threshold is never found, as live). The
steps it took, times the step time after the change, are the detection (or clearing)
delay. Only the ranks concerned are fed: the slow ones (known or true) and up to
`REPLICAS` replicas each (the median of a few replicas is the reference), so a change
costs a few dozen `observe` calls on a handful of ranks, at any cluster size.

`SlowWatch` holds one run's leader view: the stragglers it knows, the detection in
progress (`Pending`), the plan before mitigation (`home`, where re-split pipelines go
back to), and the step-time predictors that know the stragglers (a
`Predictor` over a `CostModel` with that `slowdown`, the way the live leader tells its
model), which `planner.mitigation.plan_mitigation` is called with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.cluster.predict import Predictor
from planner.cost import CostModel
from planner.plan import Plan
from planner.straggler import StragglerConfig, StragglerDetector

REPLICAS = 3
"""Replicas fed with each slow rank (the detector compares with their median)."""
MAX_WINDOWS = 3
"""Windows of steps after a change the detector is given to see it."""


def stage_timings(plan: Plan, cost: CostModel, slow: dict[int, float],
                  ranks: list[int]) -> dict[int, dict]:
    """The vote timing each of `ranks` reports for one step of `plan` (the format of
    `odyssey.online_profile.stage_timing`) when rank r computes slow[r] x slower."""
    mb, out = plan.microbatch_size, {}
    for r in ranks:
        st = plan.stage(r)
        n, k = max(st.end - st.start, 1), slow.get(r, 1.0)
        out[r] = {"start": st.start, "end": st.end,
                  "fwd_s": cost.forward_s(st.start, st.end, mb) / n * k,
                  "bwd_s": cost.backward_s(st.start, st.end, mb) / n * k}
    return out


def watched_ranks(plan: Plan, slow: set[int]) -> list[int]:
    """The ranks of `slow` in `plan` and up to `REPLICAS` other holders of each one's
    stage (the same layer range)."""
    out: set[int] = set()
    for r in sorted(slow):
        if not plan.has_rank(r):
            continue
        st = plan.stage(r)
        out.add(r)
        peers = [p for p in plan.holders(st.start) if p != r and p not in slow
                 and (plan.stage(p).start, plan.stage(p).end) == (st.start, st.end)]
        out.update(peers[:REPLICAS])
    return sorted(out)


@dataclass(frozen=True)
class Detection:
    """What the detector concludes after a change of the truth."""

    steps: int
    """Committed steps after the change until it reported the change."""
    stragglers: dict[int, float]
    """Its stragglers then ({rank: factor})."""


def detect(cfg: StragglerConfig, plan: Plan, cost: CostModel, known: dict[int, float],
           truth: dict[int, float]) -> Detection | None:
    """When and what the detector reports once the truth moves from `known` (the
    steady state it had seen) to `truth`; None if it reports nothing (no change, or one
    it cannot see: a factor under the threshold). See the module docstring."""
    known = {r: f for r, f in known.items() if plan.has_rank(r)}
    truth = {r: f for r, f in truth.items() if plan.has_rank(r)}
    if known == truth:
        return None
    ranks = watched_ranks(plan, set(known) | set(truth))
    if not ranks:
        return None
    before, after = (stage_timings(plan, cost, slow, ranks) for slow in (known, truth))
    det, w = StragglerDetector(cfg), cfg.window
    det.assume(known)  # what the leader knew when this plan began
    for s in range(-2 * w, 0):  # the generation's first window (its baseline), and one more
        det.observe(s, before)
    seen = set(det.current)
    for s in range(1, MAX_WINDOWS * w + 1):
        det.observe(s, after)
        if set(det.current) != seen:
            return Detection(s, {r: x.factor for r, x in det.current.items()})
    return None


@dataclass
class Pending:
    """A detection under way: at `time_s` the leader learns `stragglers`."""

    time_s: float
    delay_s: float
    stragglers: dict[int, float]


@dataclass
class SlowWatch:
    """One run's leader view of stragglers (see the module docstring)."""

    cfg: StragglerConfig
    base: Predictor
    """The run's predictor (no straggler known)."""
    known: dict[int, float] = field(default_factory=dict)
    """Stragglers the leader knows ({rank: factor}), what mitigation plans around."""
    pending: Pending | None = None
    home: Plan | None = None
    """The plan before the first mitigation (None: not mitigating)."""

    def rewatch(self, plan: Plan, truth: dict[int, float], now_s: float,
                step_s: float) -> None:
        """The truth or the plan changed at `now_s` (step time `step_s` from then on):
        restart the detection from here."""
        d = detect(self.cfg, plan, self.base.cost, self.known, truth)
        self.pending = (None if d is None or d.stragglers == self.known
                        else Pending(now_s + d.steps * step_s, d.steps * step_s,
                                     d.stragglers))

    def forget(self, members: list[int]) -> None:
        """Drop stragglers no longer in the job (lost: a replacement is not slow); the
        membership changed, so a recovery plan replaced the one mitigation started from."""
        alive = set(members)
        self.known = {r: f for r, f in self.known.items() if r in alive}
        self.home = None

    def switched(self, before: Plan) -> None:
        """A mitigation replaced `before`: remember the plan to go back to, or, once
        nobody is slow (the way back), forget it."""
        if not self.known:
            self.home = None
        elif self.home is None:
            self.home = before

    def predictor(self) -> Predictor:
        """Step times with the known stragglers' factors in the cost model."""
        return self.base.with_slowdown(self.known)

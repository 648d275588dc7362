"""Fail-slow detection: which ranks compute persistently slower than they should.

Every rank reports with its commit vote how long its forward and backward took per layer
and microbatch (``timing``: ``start``, ``end``, ``fwd_s``, ``bwd_s``). The leader feeds
each committed step's timings to a :class:`StragglerDetector`, which compares every rank
with a reference for the same work:

- its **replicas**, the ranks that hold the same layers in other pipelines (the median of
  their times in the same step, so the machine's momentary load cancels out);
- without replicas, its own **baseline**: the median of its first ``window`` steps in the
  generation (the job's own profile of that stage, measured before anything changed),
  divided by how far the other ranks drifted from theirs (the median of their time over
  baseline), so a machine that gets busier as a whole flags nobody. A rank that was a
  straggler when the generation began (a mitigation re-partitioned its layers, so no
  replica holds the same ones; or a failure's recovery plan) measured that baseline at
  its known factor: its time over the baseline is multiplied by that factor, so it stays
  measured at its true slowdown while slow and is cleared once it recovers. Times are
  per layer and microbatch, so a rank holding fewer layers or microbatches after a
  mitigation compares like with like.

A rank's factor at a step is its time over the reference. It becomes a straggler once
``persistence`` of its last ``window`` factors reach ``threshold`` (so hiccups, even
every other step, never count: a shared machine's scheduler makes those), and stops
being one once the median of that window falls below ``clear_threshold`` (hysteresis: no
flapping around the threshold; ``carried_tolerance`` for a factor carried into a
baseline, which is known less exactly). Torch-free and
standard library only, so the live runtime and the cluster simulator share it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from math import log
from statistics import median


@dataclass(frozen=True)
class StragglerConfig:
    """Fail-slow detection on the leader, from the timings in the commit votes."""

    enabled: bool = True
    """Watch for stragglers (events ``straggler`` / ``straggler_cleared`` in events.jsonl
    and the report, the status record, the Prometheus gauge)."""
    threshold: float = 1.8
    """A rank is a straggler once `persistence` of its last `window` slowdown factors (its
    compute time over its replicas' median, or over its own baseline) are at least this."""
    persistence: float = 0.75
    """The fraction of the window's steps that must be that slow: a straggler is slow
    step after step, a busy shared machine only now and then."""
    clear_threshold: float = 1.3
    """A straggler is cleared once that median falls below this (< threshold:
    hysteresis against flapping)."""
    carried_tolerance: float = 1.25
    """How far off a factor carried into a baseline may be. A re-partition gives a
    straggler layers no replica holds, so it is measured against its own baseline times
    the factor it was found at; that factor was measured against replicas under other
    load (they ran faster while it stalled), so such a rank is cleared below
    clear_threshold x this (capped at threshold / 1.1: still hysteresis). A rank back at
    full speed can read 1.3x there on a loaded machine; one still slow stays above."""
    window: int = 8
    """Committed steps judged together; detection takes about `persistence` x this many
    steps after the slowdown starts."""
    mitigate: bool = True
    """Route work around a straggler: re-deal microbatches so its pipeline trains fewer,
    or move layers off it to its pipeline's other stages, or both (`planner.mitigation`),
    when the cost model predicts it pays by `min_gain`, and re-plan back once it is
    cleared. Off: stragglers are only reported."""
    drop: bool = False
    """Mitigation may also drop a straggler: its launcher kills it and the survivors
    recover without it (the failure recovery the model would choose), when that beats
    every in-place mitigation by `drop_gain` (a rank many times slower). Only under
    `odyssey run`, whose launchers fence ranks. Off by default: the model does not know
    how long a slowdown lasts, and a dropped rank stays out after it passes (in the
    cluster simulator's day with 30-minute 20x episodes, dropping trained 15% less than
    working around them); turn it on where slow nodes stay slow or get replaced."""
    park: bool = True
    """Mitigation may also park a straggler: it leaves the plan but stays in the job, its
    stage's work rerouted through its replicas (the pipelines missing it send their
    microbatches through the other pipelines' holders of those layers: the survivors'
    ``reroute`` recovery, nothing moves), while it probes its own speed; once the probe
    clears it (the same detector, against its replicas' full-speed time) it rejoins like
    a replacement worker, taking its layers from live holders. Reversible, so no bar
    beyond `min_gain`. The leader is never parked (it holds the decision)."""
    probe_every_s: float = 0.5
    """A parked rank times one forward and backward of its layers this often."""
    drop_gain: float = 1.25
    """How many times faster than the best in-place mitigation (predicted step time)
    dropping must be: it is irreversible (the rank does not come back when its slowdown
    passes; a replacement may join, as after any failure)."""
    min_gain: float = 1.05
    """A mitigation (or the re-plan back) is taken only when its predicted step time is
    this many times better than keeping the plan."""
    warmup_steps: int = 2
    """Committed steps at the start of each generation that are not judged (the first
    ones redo set-up and warm caches: a rank slower there by chance must not count)."""
    min_compute_s: float = 1e-5
    """Per layer and microbatch compute times below this are not compared (too small to
    time reliably)."""

    def __post_init__(self) -> None:
        if self.threshold <= 1:
            raise ValueError(f"straggler.threshold must be > 1, got {self.threshold}")
        if not 1 <= self.clear_threshold <= self.threshold:
            raise ValueError(f"straggler.clear_threshold must be in [1, threshold "
                             f"{self.threshold}], got {self.clear_threshold}")
        if self.carried_tolerance < 1:
            raise ValueError(f"straggler.carried_tolerance must be >= 1, got "
                             f"{self.carried_tolerance}")
        if not 0.5 < self.persistence <= 1:
            raise ValueError(f"straggler.persistence must be in (0.5, 1] (most of the "
                             f"window), got {self.persistence}")
        if self.window < 3:
            raise ValueError(f"straggler.window must be >= 3 (a median that one step cannot "
                             f"move), got {self.window}")
        if self.min_gain < 1:
            raise ValueError(f"straggler.min_gain must be >= 1, got {self.min_gain}")
        if self.drop_gain < 1:
            raise ValueError(f"straggler.drop_gain must be >= 1, got {self.drop_gain}")
        if self.warmup_steps < 0:
            raise ValueError(f"straggler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.probe_every_s <= 0:
            raise ValueError(f"straggler.probe_every_s must be > 0, got {self.probe_every_s}")
        if self.min_compute_s < 0:
            raise ValueError(f"straggler.min_compute_s must be >= 0, got {self.min_compute_s}")


@dataclass(frozen=True)
class Straggler:
    """A rank found persistently slow."""

    rank: int
    factor: float
    """Median slowdown (e.g. 3.0: three times slower): over its slow steps when found,
    over the window after that."""
    since_step: int
    """The step its slowdown began, fitted over the window it was found in (see
    `_onset`: one noisy step before the slowdown or one dip inside it does not move it)."""
    reference: str
    """What it was compared with: replicas or baseline."""

    def to_dict(self) -> dict:
        return {"rank": self.rank, "factor": self.factor, "since_step": self.since_step,
                "reference": self.reference}


@dataclass(frozen=True)
class StragglerChange:
    """A rank became a straggler (``cleared`` False) or stopped being one, at ``step``."""

    straggler: Straggler
    step: int
    cleared: bool

    def event(self) -> dict:
        """The events.jsonl record."""
        return {"kind": "straggler_cleared" if self.cleared else "straggler",
                "step": self.step, **self.straggler.to_dict()}


@dataclass
class _RankState:
    factors: deque = field(default_factory=deque)  # (step, factor) of the last window steps
    baseline: list[float] = field(default_factory=list)  # own times, first window steps
    carry: float = 1.0  # its straggler factor when the generation began: the baseline's


class StragglerDetector:
    """Per-rank robust slowdown estimates over committed steps; see the module docstring."""

    def __init__(self, cfg: StragglerConfig | None = None):
        self.cfg = cfg or StragglerConfig()
        self.current: dict[int, Straggler] = {}
        """Ranks that are stragglers now."""
        self._ranks: dict[int, _RankState] = {}
        self._generation: int | None = None
        self._steps_in_generation = 0

    def assume(self, factors: dict[int, float], since_step: int = 0) -> None:
        """Start out knowing these stragglers ({rank: factor}), e.g. a simulated leader's
        view when its plan began."""
        self.current = {r: Straggler(r, f, since_step, "assumed") for r, f in factors.items()}

    def observe(self, step: int, timings: dict[int, dict], generation: int = 0
                ) -> list[StragglerChange]:
        """Take in one committed step's timings ({rank: vote timing}); what changed."""
        if generation != self._generation:  # new plan: other layers, other replicas
            self._generation = generation
            self._ranks = {}
            self._steps_in_generation = 0
            self.current = {r: s for r, s in self.current.items() if r in timings}
        self._steps_in_generation += 1
        if not self.cfg.enabled or self._steps_in_generation <= self.cfg.warmup_steps:
            return []
        w, floor = self.cfg.window, self.cfg.min_compute_s
        times = {r: t["fwd_s"] + t["bwd_s"] for r, t in timings.items()
                 if t["fwd_s"] + t["bwd_s"] >= floor}
        layers: dict[tuple[int, int], list[int]] = {}
        for r in times:
            layers.setdefault((timings[r]["start"], timings[r]["end"]), []).append(r)
        own: dict[int, float] = {}  # time over its own baseline, once it has one
        for r, t in times.items():
            state = self._ranks.get(r)
            if state is None:
                known = self.current.get(r)
                state = self._ranks[r] = _RankState(carry=known.factor if known else 1.0)
            if len(state.baseline) < w:
                state.baseline.append(t)
            else:
                own[r] = t / median(state.baseline)
        changes = []
        for r, t in times.items():
            peers = [times[p] for p in layers[(timings[r]["start"], timings[r]["end"])]
                     if p != r]
            if peers:
                factor, kind = t / median(peers), "replicas"
            elif r in own:
                # the machine's load moves every rank's time: divide by the others' drift
                # (not the stragglers': one that recovers drops below its baseline)
                others = [f for p, f in own.items() if p != r and p not in self.current]
                drift = median(others) if others else 1.0
                factor, kind = own[r] * self._ranks[r].carry / drift, "baseline"
            else:
                continue
            state = self._ranks[r]
            state.factors.append((step, factor))
            while len(state.factors) > w:
                state.factors.popleft()
            change = self._judge(r, state, kind, step)
            if change is not None:
                changes.append(change)
        return changes

    def _clear_bar(self, kind: str, state: _RankState) -> float:
        """Below this a straggler is cleared: `clear_threshold`, raised by
        `carried_tolerance` for a factor carried into a baseline (< threshold)."""
        bar = self.cfg.clear_threshold
        if kind == "baseline" and state.carry > 1.0:
            bar = max(bar, min(bar * self.cfg.carried_tolerance, self.cfg.threshold / 1.1))
        return bar

    def _judge(self, rank: int, state: _RankState, kind: str, step: int
               ) -> StragglerChange | None:
        if len(state.factors) < self.cfg.window:
            return None
        factor = median(f for _, f in state.factors)
        slow_steps = sum(f >= self.cfg.threshold for _, f in state.factors)
        known = self.current.get(rank)
        if known is None and slow_steps >= self.cfg.persistence * len(state.factors):
            seen = list(state.factors)
            first = _onset(seen, self.cfg.threshold)
            since = seen[first][0]
            slow = median(f for _, f in seen[first:])  # the slowdown itself
            self.current[rank] = Straggler(rank, slow, since, kind)
            return StragglerChange(self.current[rank], step, cleared=False)
        if known is not None and factor < self._clear_bar(kind, state):
            del self.current[rank]
            # a baseline measured while slow: rescale it to the speed it is back at, so
            # its time no longer looks fast to the others' drift
            state.baseline = [b / state.carry for b in state.baseline]
            state.carry = 1.0
            return StragglerChange(Straggler(rank, factor, known.since_step, kind), step,
                                   cleared=True)
        if known is not None:  # still slow: keep the estimate current
            self.current[rank] = Straggler(rank, factor, known.since_step, known.reference)
        return None


def _onset(seen: list[tuple[int, float]], threshold: float) -> int:
    """Index in `seen` ((step, factor), oldest first) where the slowdown began.

    A two-level fit in log space: steps before the onset at speed (factor 1), from it on
    at the slowdown (the median of the steps over `threshold`); the onset is the slow step
    that minimises the squared error. By magnitude, not by flags: a step of noise just
    over the threshold before the slowdown stays before it, and a dip under load inside
    the slowdown does not move the start past it. The latest on a tie: a lone slow step
    followed by a fast one is likelier a preempted step of noise than a slow rank that
    looked fast."""
    level = log(median(f for _, f in seen if f >= threshold))
    logs = [log(max(f, 1e-9)) for _, f in seen]
    best, best_err = None, float("inf")
    for i, (_, f) in enumerate(seen):
        if f < threshold:
            continue
        err = sum(x * x for x in logs[:i]) + sum((x - level) ** 2 for x in logs[i:])
        if err <= best_err + 1e-12:
            best, best_err = i, err
    return best

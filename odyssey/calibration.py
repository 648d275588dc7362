"""Step-time prediction for recovery decisions, calibrated by the running job.

The profile is either given (emulated mode: the configured durations) or measured online
from the timings every rank sends with its commit vote. The event simulator predicts a
plan's step time from it; a correction factor, the median measured/predicted ratio of
recent steps (`planner.calibrate`, kind 'step', estimator 'median'), absorbs what the
model leaves out (Python, polling, contention). This module is the runtime's side: it
feeds the leader's measured steps in and keeps the factor in the store, so a new leader
inherits it. Ranks the straggler detector found slow (`set_slowdowns`) are predicted
that much slower and left out of the online profile, so neither the profile nor the
factor absorbs their slowness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import median

import torch
import torch.distributed as dist

from odyssey import contract
from odyssey.model import LayeredModel
from odyssey.online_profile import OnlineProfile
from odyssey.precision import PrecisionConfig
from planner.calibrate import Calibration, CalibrationConfig
from planner.cluster.predict import Predictor
from planner.cost import CostModel
from planner.memory import MemoryModel
from planner.partition import Partitioner
from planner.plan import Plan
from planner.simulate import simulate_plan
from profiler.profile import Profile

EVENT_UPTO_RANKS = 64
"""Plans on at most this many ranks are predicted by the event simulator."""


class StepTimeModel:
    """Predicts step times of candidate plans; see the module docstring."""

    def __init__(self, model: LayeredModel, microbatch_size: int, store: dist.Store,
                 profile: Profile | None = None, window: int = 20,
                 precision: PrecisionConfig | None = None):
        self.model = model
        self.precision = precision or PrecisionConfig()  # boundaries cross in its dtype
        self.microbatch_size = microbatch_size
        self.store = store
        self.profile = profile
        self.online = OnlineProfile(model.num_layers)
        # the raw median, unclamped: a whole step can be far slower than a profile that
        # leaves most of it out (emulated compute of 0 ms)
        self.calibration = Calibration(CalibrationConfig(
            estimator="median", window=window, min_factor=0.0, max_factor=math.inf))
        self._predicted_now: float | None = None
        self.slowdowns: dict[int, float] = {}
        """Rank -> measured slowdown of the ranks found slow now."""
        self.copy_Bps: dict[int, float] = {}
        """Rank -> copy bandwidth to host and back its Chameleon lanes measure while it
        swaps (the latest vote that carried one)."""

    def set_slowdowns(self, slow: dict[int, float], plan: Plan | None = None,
                      measured_s: float | None = None) -> None:
        """The stragglers now and their factors (empty: none). With the running `plan`
        and its recent measured step time, the correction factor starts over from that
        one ratio: the factor learnt before is wrong by the slowdown it did not know."""
        self.slowdowns = dict(slow)
        self._predicted_now = None  # the prediction of the running plan changed
        if plan is None or not measured_s:
            return
        self.calibration.reset("step")
        predicted = self.simulator()(plan)
        if predicted > 0:
            self.store.set(contract.CALIBRATION_FACTOR, repr(measured_s / predicted))

    def observe_votes(self, votes: dict[int, dict]) -> None:
        self.online.observe_step([v["timing"] for r, v in votes.items()
                                  if r not in self.slowdowns])
        for r, v in votes.items():
            bw = (v.get("swap") or {}).get("copy_Bps")
            if bw:
                self.copy_Bps[r] = float(bw)

    def host_copy_Bps(self) -> float | None:
        """The copy bandwidth swap pricing should use: the median of what the swapping
        ranks' lanes measure online (None until one has swapped)."""
        return median(self.copy_Bps.values()) if self.copy_Bps else None

    def current_profile(self) -> Profile:
        """The profile predictions use: the given one, or the one measured online."""
        if self.profile is not None:
            return self.profile
        spec = self.model.activation_spec(self.microbatch_size)
        itemsize = self.precision.wire_dtype(spec.dtype).itemsize
        act = float(torch.Size(spec.shape).numel() * itemsize)
        return self.online.to_profile(self.model.name, self.microbatch_size, act)

    def simulator(self) -> Callable[[Plan], float]:
        """Uncalibrated prediction from the profile (given, or measured online): the
        event simulator, or above `EVENT_UPTO_RANKS` the cluster simulator's closed form
        (a second per plan at a thousand ranks would stall the recovery decision)."""
        cost = CostModel(self.current_profile(), slowdown=self.slowdowns)
        fast = Predictor(cost, "closed-form", 1.0)
        return lambda plan: (simulate_plan(plan, cost).step_time_s
                             if plan.world_size <= EVENT_UPTO_RANKS else fast(plan))

    def partitioner(self) -> Partitioner:
        """Layer time and memory tables of the same profile, for splitting layers into
        stages (fresh recovery plans)."""
        return CostModel(self.current_profile()).partitioner(self.microbatch_size)

    def memory_model(self) -> MemoryModel:
        """Per-rank memory of candidate plans, from the same profile."""
        return MemoryModel(self.current_profile())

    def predictor(self) -> Callable[[Plan], float]:
        """Calibrated prediction (simulator x the current correction factor)."""
        sim = self.simulator()
        key = contract.CALIBRATION_FACTOR
        factor = float(self.store.get(key)) if self.store.check([key]) else 1.0
        return lambda plan: sim(plan) * factor

    def observe_step(self, plan: Plan, seconds: float, first_of_generation: bool) -> None:
        """Leader, after each committed step: fold its measured time into the factor."""
        if first_of_generation:
            self._predicted_now = None  # the plan changed; its first step redoes work
            return
        if self._predicted_now is None:
            self._predicted_now = self.simulator()(plan)
        self.calibration.observe("step", self._predicted_now, seconds)
        stats = self.calibration.kinds.get("step")
        if stats is not None and stats.accepted >= 2:  # one store write per step
            self.store.set(contract.CALIBRATION_FACTOR, repr(stats.factor))

    def layer_bytes(self) -> list[float]:
        """Parameter + AdamW state bytes per layer (what a migration moves)."""
        if self.profile is not None:
            return [3.0 * lp.param_bytes for lp in self.profile.layers]
        return [12.0 * n for n in self.online.params]  # fp32 params + two moments

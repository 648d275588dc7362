"""The leader's straggler mitigation: stragglers in, a re-planned generation out.

When the straggler watch (odyssey/stragglers.py) finds a rank slow or clears one, the
step-time model is told the slow ranks' factors (so every prediction, recoveries' too,
covers them) and `planner.mitigation.plan_mitigation` chooses between keeping the plan,
re-dealing microbatches and re-partitioning the slow pipeline's layers (with the
microbatches re-dealt too or not), parking the slow ranks (they leave the plan, their
stages' work rerouted through their replicas, and rejoin once their own probe finds them
fast again: odyssey/parked.py, `Coordinator.park`), and, under a launcher that fences,
dropping them: they are killed and the survivors recover without them, an ordinary
failure recovery (`Coordinator.drop`). The plan before the first switch is kept as `home`:
once nobody is slow, re-split pipelines take its layouts back. A switch goes through
`Coordinator.request_replan`: an ordinary generation change with every member in, so the
usual guarantees hold (same samples, same trajectory, replicas checked); layers that move
migrate from their holders in that change like a recovery's.

Events (events.jsonl, so the report lists them): ``mitigation`` at each decision (the
stragglers, the chosen kind, predicted step times of keeping and of the choice, the
measured step time before it, every candidate), and ``mitigation_result`` once the new
plan has run `window` steps (its measured step time against the prediction).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from statistics import median

from odyssey.calibration import StepTimeModel
from odyssey.coordinator import Coordinator
from odyssey.hooks import CommittedStep, Recovery, TrainerHook
from odyssey.parked import parked_now, take_back_record
from planner.cost import CostModel
from planner.mitigation import plan_mitigation
from planner.placement import RecoveryContext
from planner.plan import Plan
from planner.recovery import RecoveryConfig
from planner.straggler import StragglerConfig


def full_speed_s(votes: dict[int, dict], rank: int, factor: float) -> float:
    """`rank`'s forward + backward seconds per layer and microbatch at full speed, from a
    step's votes: its replicas' (the ranks that ran the same layers), else its own over
    its slowdown `factor`."""
    own = votes[rank]["timing"]
    same = [v["timing"] for r, v in votes.items() if r != rank and "timing" in v
            and (v["timing"]["start"], v["timing"]["end"]) == (own["start"], own["end"])]
    if same:
        return median(t["fwd_s"] + t["bwd_s"] for t in same)
    return (own["fwd_s"] + own["bwd_s"]) / factor


class StragglerMitigation(TrainerHook):
    """Leader only; see the module docstring."""

    def __init__(self, cfg: StragglerConfig, recovery: RecoveryConfig, coord: Coordinator,
                 step_model: StepTimeModel, event: Callable[[dict], None],
                 say: Callable[[str, int, int], None], can_fence: bool = False):
        """`can_fence`: the launcher kills fenced ranks (`odyssey run`), so a straggler
        may be dropped (`StragglerConfig.drop`)."""
        self.cfg = cfg
        self.can_drop = cfg.drop and can_fence
        self.recovery = recovery
        self.coord = coord
        self.step_model = step_model
        self.event = event
        self.say = say
        self._recent: deque[float] = deque(maxlen=cfg.window)  # step times, this generation
        self._generation = -1
        self._pending: dict | None = None  # a switch whose measured step time is due
        self._recheck = False  # a recovery replaced the plan while stragglers are known
        self._home: Plan | None = None  # the plan before mitigation, to go back to
        coord.on_newcomers = self.unparked

    def stragglers_changed(self, c: CommittedStep, slow: dict[int, float]) -> None:
        """The watch's set of stragglers changed at committed step `c` (leader)."""
        recent = list(self._recent)[-3:]  # the last steps: at the speed the change found
        self.step_model.set_slowdowns(slow, c.plan, median(recent) if recent else None)
        if not self.cfg.mitigate:
            return
        ctx = RecoveryContext(c.plan, c.members, c.step, self.step_model.layer_bytes())
        cost = CostModel(self.step_model.current_profile(), slowdown=slow)
        capacity = self.coord.capacity_bytes()
        # never the leader: it holds the detector and the decision
        parkable = [r for r in slow if r != min(c.members)] if self.cfg.park else []
        recover = ((lambda without: self.coord.recovery_candidates(without)[0])
                   if self.can_drop or parkable else None)
        choice = plan_mitigation(ctx, self.step_model.predictor(), self.recovery,
                                 self.cfg.min_gain, cost=cost, home=self._home,
                                 memory_limit=capacity, recover=recover,
                                 drop_gain=self.cfg.drop_gain, can_drop=self.can_drop,
                                 parkable=parkable)
        keep = next(x for x in choice.candidates if x.kind == "keep")
        chosen = choice.chosen
        record = {"kind": "mitigation", "step": c.step, "generation": c.generation,
                  "stragglers": {str(r): f for r, f in sorted(slow.items())},
                  "chosen": chosen.kind, "note": chosen.note,
                  "predicted_step_s": chosen.predicted_step_s,
                  "keep_predicted_step_s": keep.predicted_step_s,
                  "measured_step_s": median(self._recent) if self._recent else None,
                  "candidates": choice.rows()}
        self.event(record)
        if not choice.switch:
            return
        what = (f"rank(s) {sorted(slow)} slow" if slow else "no straggler left")
        self.say(f"mitigation: {what}; {chosen.kind} ({chosen.note}), predicted step "
                 f"{keep.predicted_step_s * 1e3:.0f} -> {chosen.predicted_step_s * 1e3:.0f} ms",
                 c.step, c.generation)
        self._pending = {"kind": "mitigation_result", "chosen": chosen.kind,
                         "decided_step": c.step,
                         "predicted_step_s": chosen.predicted_step_s}
        if chosen.kind == "drop":
            gone = choice.leaving
            if not self.coord.drop(gone, f"straggler dropped: {chosen.note}"):
                self._pending = None
                self.say(f"mitigation: no launcher confirmed fencing rank(s) {gone}; "
                         f"keeping them", c.step, c.generation)
            return
        if chosen.kind == "park":  # they come back through their own probe, not home
            reference = {}
            for r in choice.leaving:
                reference[r] = full_speed_s(c.votes or {}, r, slow[r])
            self.coord.park(choice, c.step, slow, reference,
                            f"straggler parked: {chosen.note}")
            return
        if not slow:
            self._home = None  # on the way back
        elif self._home is None:
            self._home = c.plan
        self.coord.request_replan(choice, f"straggler mitigation: {chosen.note}")

    def unparked(self, newcomers: list[int], step: int) -> None:
        """The parked ranks among a recovery's `newcomers` rejoin, their probes found them
        at speed: no longer slow (the recovery deciding their return predicts them at
        full speed)."""
        back = {r: b for r in newcomers
                if (b := take_back_record(self.coord.store, r)) is not None}
        if not back:
            return
        slow = {r: f for r, f in self.step_model.slowdowns.items() if r not in back}
        self.step_model.set_slowdowns(slow)
        for r, b in sorted(back.items()):
            self.event({"kind": "straggler_cleared", "rank": r, "factor": b["factor"],
                        "since_step": b["parked_step"], "step": step,
                        "reference": "probe", "probes": b["probes"],
                        "generation": self._generation})
            self.say(f"straggler cleared: rank {r} probed {b['factor']:.1f}x (after "
                     f"{b['probes']} probes) and rejoins", step, self._generation)

    def parked(self) -> list[dict]:
        """Stragglers parked now (out of the plan, probing; or cleared and waiting for
        the join), for the status record."""
        return [{"rank": rec["rank"], "factor": rec["factor"], "since_step": rec["step"],
                 "reference": "rejoining" if rec.get("rejoining") else "parked"}
                for rec in parked_now(self.coord.store)]

    def on_recovered(self, recovery: Recovery) -> None:
        # a failure's recovery plan is chosen with the stragglers' factors but not around
        # them: once the new plan has run a few steps, mitigate again
        self._recheck = recovery.decision.policy != "mitigate"
        if self._recheck:
            self._home = None  # the failure's plan replaced the one mitigation started from

    def on_step_committed(self, c: CommittedStep) -> None:
        if not c.leader:
            return
        if c.generation != self._generation:  # the first step of a plan redoes set-up
            self._generation = c.generation
            self._recent.clear()
            return
        self._recent.append(c.step_s)
        if self._recheck and len(self._recent) >= 3:
            self._recheck = False
            slow = {r: f for r, f in self.step_model.slowdowns.items() if r in c.members}
            if slow:
                self.stragglers_changed(c, slow)
        p = self._pending
        if p is not None and c.step > p["decided_step"] and len(self._recent) == \
                self._recent.maxlen:
            self._pending = None
            measured = median(self._recent)
            self.event({**p, "step": c.step, "generation": c.generation,
                        "measured_step_s": measured,
                        "error": measured / p["predicted_step_s"] - 1
                        if p["predicted_step_s"] > 0 else None})

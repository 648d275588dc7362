"""The leader's straggler watch: commit-vote timings in, ``straggler`` events out.

A TrainerHook around :class:`planner.straggler.StragglerDetector` (the detection itself,
torch-free, shared with the cluster simulator). On the leader, every committed step's
votes are fed to it; a rank found persistently slow (or no longer slow) is written to
events.jsonl (so the report lists it), said on the log, and listed in the status record
(odyssey/status.py) while it lasts, and `on_change` hears the new set (the mitigation,
odyssey/mitigation.py). A new leader starts a fresh watch.
"""

from __future__ import annotations

from collections.abc import Callable

from odyssey.hooks import CommittedStep, TrainerHook
from planner.straggler import StragglerConfig, StragglerDetector


class StragglerWatch(TrainerHook):
    """Feeds the detector on the leader; see the module docstring."""

    def __init__(self, cfg: StragglerConfig, event: Callable[[dict], None],
                 say: Callable[[str, int, int], None],
                 on_change: Callable[[CommittedStep, dict[int, float]], None] | None = None):
        """`event`: append a record to events.jsonl; `say(msg, step, generation)`: one
        log line; `on_change(step, {rank: factor})`: the stragglers after a change."""
        self.detector = StragglerDetector(cfg)
        self.event = event
        self.say = say
        self.on_change = on_change

    def on_step_committed(self, c: CommittedStep) -> None:
        if c.votes is None or not self.detector.cfg.enabled:
            return
        timings = {r: v["timing"] for r, v in c.votes.items() if "timing" in v}
        changes = self.detector.observe(c.step, timings, c.generation)
        for change in changes:
            self.event({**change.event(), "generation": c.generation,
                        "detection_delay_steps": change.step - change.straggler.since_step})
            s = change.straggler
            self.say(f"straggler cleared: rank {s.rank} ({s.factor:.1f}x its {s.reference})"
                     if change.cleared else
                     f"straggler: rank {s.rank} is {s.factor:.1f}x slower than its "
                     f"{s.reference} since step {s.since_step}", c.step, c.generation)
        if changes and self.on_change is not None:
            self.on_change(c, {r: s.factor for r, s in self.detector.current.items()})

    def current(self) -> list[dict]:
        """The stragglers now, for the status record."""
        return [s.to_dict() for s in sorted(self.detector.current.values(),
                                            key=lambda s: s.rank)]


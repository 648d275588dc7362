"""The leader's straggler watch: commit-vote timings in, ``straggler`` events out.

A TrainerHook around :class:`planner.straggler.StragglerDetector` (the detection itself,
torch-free, shared with the cluster simulator). On the leader, every committed step's
votes are fed to it; a rank found persistently slow (or no longer slow) is written to
events.jsonl (so the report lists it), said on the log, and listed in the status record
(odyssey/status.py) while it lasts. A new leader starts a fresh watch.
"""

from __future__ import annotations

from collections.abc import Callable

from odyssey.hooks import CommittedStep, TrainerHook
from planner.straggler import StragglerConfig, StragglerDetector


class StragglerWatch(TrainerHook):
    """Feeds the detector on the leader; see the module docstring."""

    def __init__(self, cfg: StragglerConfig, event: Callable[[dict], None],
                 say: Callable[[str, int, int], None]):
        """`event`: append a record to events.jsonl; `say(msg, step, generation)`: one
        log line."""
        self.detector = StragglerDetector(cfg)
        self.event = event
        self.say = say

    def on_step_committed(self, c: CommittedStep) -> None:
        if c.votes is None or not self.detector.cfg.enabled:
            return
        timings = {r: v["timing"] for r, v in c.votes.items() if "timing" in v}
        for change in self.detector.observe(c.step, timings, c.generation):
            self.event({**change.event(), "generation": c.generation})
            s = change.straggler
            self.say(f"straggler cleared: rank {s.rank} ({s.factor:.1f}x its {s.reference})"
                     if change.cleared else
                     f"straggler: rank {s.rank} is {s.factor:.1f}x slower than its "
                     f"{s.reference} since step {s.since_step}", c.step, c.generation)

    def current(self) -> list[dict]:
        """The stragglers now, for the status record."""
        return [s.to_dict() for s in sorted(self.detector.current.values(),
                                            key=lambda s: s.rank)]

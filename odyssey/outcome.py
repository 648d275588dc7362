"""What a recovery plan delivered against what the model predicted for it (leader).

After each recovery (or re-plan) the leader watches the new generation's next steps and
records one `recovery_result` event: the median measured step time next to the decision's
predicted one, and for every rank that ran Chameleon under the plan (a swap-priced
candidate) its budget and the most saved-activation bytes it kept resident, from the
votes. The first step of a generation is left out: it redoes the interrupted step and
starts new groups.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import median

from odyssey.hooks import CommittedStep, Recovery, TrainerHook

STEPS = 5
"""Steps after the first whose times make the measured figure."""


class RecoveryOutcome(TrainerHook):
    """Emits `recovery_result` events through `emit`; see the module docstring."""

    def __init__(self, emit: Callable[[dict], None], steps: int = STEPS):
        self.emit = emit
        self.steps = steps
        self._decision = None
        self._generation = -1
        self._times: list[float] = []
        self._swap: dict[int, dict] = {}
        self._skip_first = True

    def on_recovered(self, recovery: Recovery) -> None:
        if recovery.decision.policy == "mitigate":  # odyssey.mitigation reports those
            self._decision = None
            return
        self._decision, self._generation = recovery.decision, recovery.generation
        self._times, self._swap, self._skip_first = [], {}, True

    def on_step_committed(self, c: CommittedStep) -> None:
        if not c.leader or self._decision is None or c.generation != self._generation:
            return
        for r, v in (c.votes or {}).items():
            s = v.get("swap")
            if s is not None:
                seen = self._swap.setdefault(r, {"budget": s["budget"], "peak_resident": 0})
                seen["budget"] = s["budget"]
                seen["peak_resident"] = max(seen["peak_resident"], s["peak"])
                if s.get("copy_Bps"):
                    seen["copy_Bps"] = s["copy_Bps"]
        if self._skip_first:
            self._skip_first = False
            return
        self._times.append(c.step_s)
        if len(self._times) >= self.steps:
            self.emit_now(c.step)

    def on_fit_end(self, result) -> None:  # events.jsonl only: report.json is written
        if self._decision is not None and self._times:
            self.emit_now(-1)

    def emit_now(self, step: int) -> None:
        d = self._decision
        measured = median(self._times)
        predicted = d.chosen.predicted_step_s
        self.emit({"kind": "recovery_result", "generation": self._generation, "step": step,
                   "chosen": d.chosen.kind, "policy": d.policy,
                   "predicted_step_s": predicted, "measured_step_s": measured,
                   "steps": len(self._times),
                   "error": (predicted - measured) / measured if measured > 0 else None,
                   "swap_s": d.chosen.swap_s,
                   "swapping": {str(r): s for r, s in sorted(self._swap.items())}})
        self._decision = None

"""Calibration: per-kind correction factors learnt from measured times.

The one implementation of the factor math, used by the cost model (per instruction
kind), the live runtime (`odyssey.calibration`, whole steps: kind 'step') and the
accuracy benchmark (per-run factors). Each observation is a (predicted, measured) pair
for one kind; predictions x factor then track the real machine. Two estimators:

- 'ewma' (default): an EWMA of log(measured / predicted), bias-corrected while samples
  are few. Outliers - ratios further than `outlier_mads` robust deviations from the
  recent median - are counted but not learnt; they still enter the recent window, so a
  lasting change of regime is accepted after a few steps instead of being rejected
  forever.
- 'median': the median ratio of the `window` most recent observations. A burst spoils
  one sample, not the factor, and nothing older than the window is remembered.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

# Instruction op value -> calibration kind (all p2p ops share one factor).
KIND_OF_OP = {
    "forward": "forward", "backward": "backward",
    "send_act": "p2p", "recv_act": "p2p", "send_grad": "p2p", "recv_grad": "p2p",
    "allreduce": "allreduce", "commit": "commit", "optimizer_step": "optimizer",
}
KINDS = ("forward", "backward", "p2p", "allreduce", "commit", "optimizer", "step")
ESTIMATORS = ("ewma", "median")


@dataclass(frozen=True)
class CalibrationConfig:
    """How measured times correct predictions."""

    estimator: str = "ewma"
    """'ewma' (log-ratio EWMA with outlier rejection) or 'median' (median ratio of the
    `window` most recent observations); see the module docstring."""
    ewma_weight: float = 0.2
    """Weight of a new (log) ratio in the running factor."""
    window: int = 32
    """Recent ratios kept per kind (outlier detection; the median estimator's window)."""
    outlier_mads: float = 4.0
    """Ratios further than this many robust deviations from the recent median are
    counted as outliers and not learnt."""
    min_samples: int = 4
    """Ratios needed in the window before outlier rejection starts."""
    min_factor: float = 0.02
    """Lower clamp of a factor."""
    max_factor: float = 50.0
    """Upper clamp of a factor."""

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; expected one of "
                             f"{ESTIMATORS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@dataclass
class KindStats:
    """Calibration state and error record of one kind."""

    factor: float = 1.0
    """Current correction: predictions of this kind are multiplied by it."""
    accepted: int = 0
    """Observations learnt."""
    rejected: int = 0
    """Observations dropped as outliers."""
    abs_rel_errors: list[float] = field(default_factory=list)
    """|predicted x factor - measured| / measured of each observation, using the factor
    in force *before* it was learnt (an honest out-of-sample error record)."""
    recent: deque = field(default_factory=lambda: deque(maxlen=32))
    """Recent ratios measured / predicted (accepted and rejected)."""
    log_sum: float = 0.0
    """Running mean/EWMA of accepted log ratios (the 'ewma' estimator)."""

    def error_summary(self) -> dict:
        errs = sorted(self.abs_rel_errors)
        if not errs:
            return {"n": 0}
        return {"n": len(errs), "median": statistics.median(errs),
                "p90": errs[min(len(errs) - 1, int(0.9 * len(errs)))], "max": errs[-1]}


class Calibration:
    """Per-kind correction factors; see the module docstring."""

    def __init__(self, config: CalibrationConfig | None = None):
        self.config = config or CalibrationConfig()
        self.kinds: dict[str, KindStats] = {}

    @staticmethod
    def kind_of(op: object) -> str:
        """Calibration kind of an `Op`, an op value string or a kind name."""
        name = getattr(op, "value", op)
        if name in KIND_OF_OP:
            return KIND_OF_OP[name]
        if name in KINDS:
            return str(name)
        raise ValueError(f"unknown op kind {op!r}; expected an Op or one of {KINDS}")

    def factor(self, op: object) -> float:
        st = self.kinds.get(self.kind_of(op))
        return st.factor if st else 1.0

    def observe(self, op: object, predicted_s: float, measured_s: float) -> bool:
        """Learn from one measurement; returns False when it was rejected as an outlier.

        `predicted_s` is the *uncalibrated* prediction (what the profile says).
        """
        if predicted_s <= 0 or measured_s <= 0 or not math.isfinite(predicted_s + measured_s):
            return False
        cfg = self.config
        kind = self.kind_of(op)
        st = self.kinds.setdefault(kind, KindStats(recent=deque(maxlen=cfg.window)))
        st.abs_rel_errors.append(abs(predicted_s * st.factor - measured_s) / measured_s)
        ratio = measured_s / predicted_s
        if cfg.estimator == "median":
            st.recent.append(ratio)
            st.accepted += 1
            st.factor = self._clamp(statistics.median(st.recent))
            return True
        r = math.log(ratio)
        outlier = False
        if len(st.recent) >= cfg.min_samples:
            logs = [math.log(x) for x in st.recent]
            med = statistics.median(logs)
            mad = statistics.median(abs(x - med) for x in logs) * 1.4826
            outlier = abs(r - med) > cfg.outlier_mads * max(mad, 0.05)
        st.recent.append(ratio)
        if outlier:
            st.rejected += 1
            return False
        st.accepted += 1
        w = max(cfg.ewma_weight, 1.0 / st.accepted)  # mean while few, EWMA afterwards
        st.log_sum = (1 - w) * st.log_sum + w * r
        st.factor = self._clamp(math.exp(st.log_sum))
        return True

    def _clamp(self, factor: float) -> float:
        return min(self.config.max_factor, max(self.config.min_factor, factor))

    def factors(self) -> dict[str, float]:
        """Current factor of every observed kind."""
        return {k: st.factor for k, st in sorted(self.kinds.items())}

    def reset(self, op: object | None = None) -> None:
        """Forget one kind (or all), e.g. after the hardware changed."""
        if op is None:
            self.kinds.clear()
        else:
            self.kinds.pop(self.kind_of(op), None)

    def report(self) -> dict[str, dict]:
        """Per kind: factor, accepted/rejected counts and out-of-sample error summary."""
        return {k: {"factor": st.factor, "accepted": st.accepted, "rejected": st.rejected,
                    "error": st.error_summary()} for k, st in sorted(self.kinds.items())}

    def to_dict(self) -> dict:
        return {k: {"factor": st.factor, "log_sum": st.log_sum, "accepted": st.accepted,
                    "rejected": st.rejected, "recent": list(st.recent)}
                for k, st in self.kinds.items()}

    @classmethod
    def from_dict(cls, d: dict, config: CalibrationConfig | None = None) -> Calibration:
        cal = cls(config)
        for k, v in d.items():
            st = KindStats(factor=float(v["factor"]), accepted=int(v["accepted"]),
                           rejected=int(v["rejected"]),
                           recent=deque(v.get("recent", []), maxlen=cal.config.window),
                           log_sum=float(v["log_sum"]))
            cal.kinds[cal.kind_of(k)] = st
        return cal

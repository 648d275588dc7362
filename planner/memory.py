"""Memory model: what a rank holds for a stage under a schedule.

static = parameters + gradients + optimizer state (AdamW: two fp32 moments), per layer;
activations = (bytes saved for backward by the stage's layers + the stage's output
buffer, none on the last stage) x microbatches in flight. 1F1B keeps at most p - s
microbatches alive on stage s of p; GPipe keeps all m.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.plan import Plan
from profiler.profile import Profile


@dataclass(frozen=True)
class MemoryConfig:
    """Memory accounting knobs beyond what the profile says."""

    reserve_bytes: float = 0.0
    """Fixed per-rank overhead (framework, allocator fragmentation, comm buffers)."""
    optimizer_bytes_per_param: float | None = None
    """Optimizer state bytes per parameter element; None uses the profile's value."""
    grad_bytes_per_param: float | None = None
    """Gradient bytes per parameter element; None uses the profile's value."""


@dataclass(frozen=True)
class RankMemory:
    """Peak memory of one rank, by category (bytes)."""

    params: float
    """Parameters of the layers held."""
    grads: float
    """Gradients of those parameters."""
    optimizer: float
    """Optimizer state."""
    activations: float
    """Activations alive at the peak (saved tensors + stage output buffers)."""
    reserve: float = 0.0
    """Fixed overhead from `MemoryConfig.reserve_bytes`."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.reserve

    @property
    def static(self) -> float:
        return self.params + self.grads + self.optimizer + self.reserve


def inflight_microbatches(schedule: str, num_stages: int, stage: int, m: int) -> int:
    """Most microbatches whose activations stage `stage` holds at once."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(num_stages - stage, m)
    raise ValueError(f"unknown schedule {schedule!r}")


class MemoryModel:
    """Per-layer memory tables from a profile, with O(1) range sums."""

    def __init__(self, profile: Profile, config: MemoryConfig | None = None):
        self.profile = profile
        self.config = config or MemoryConfig()
        c = self.config
        self.grad_bpp = (profile.grad_bytes_per_param if c.grad_bytes_per_param is None
                         else c.grad_bytes_per_param)
        self.opt_bpp = (profile.optimizer_bytes_per_param
                        if c.optimizer_bytes_per_param is None else c.optimizer_bytes_per_param)
        self._params = _prefix([lp.param_bytes for lp in profile.layers])
        self._count = _prefix([lp.param_count for lp in profile.layers])
        self._act: dict[int, tuple[list[float], list[float]]] = {}

    def static_layer_bytes(self) -> list[float]:
        """Parameters + gradients + optimizer state per layer."""
        return [lp.param_bytes + lp.param_count * (self.grad_bpp + self.opt_bpp)
                for lp in self.profile.layers]

    def activation_tables(self, mb: int) -> tuple[list[float], list[float]]:
        """(saved bytes per layer, output bytes per layer) per microbatch of size mb.

        The output column is what a stage ending after that layer holds as its output
        buffer (and sends across the cut). The model's last layer has no cut after it:
        its output feeds the loss, which keeps only what it saves for backward (counted
        in that layer's saved bytes when profiled with the loss) and a scalar, so its
        entry is 0 (counting the logits there overstated a last stage's activations by
        one output per microbatch in flight; seen in benchmarks/model_accuracy.py).
        """
        if mb not in self._act:
            out = self.profile.column("output_bytes", mb)
            if out:
                out[-1] = 0.0
            self._act[mb] = (self.profile.column("activation_bytes", mb), out)
        return self._act[mb]

    def static(self, start: int, end: int) -> RankMemory:
        """Memory of layers [start, end) with no activations alive."""
        params = self._params[end] - self._params[start]
        count = self._count[end] - self._count[start]
        return RankMemory(params, count * self.grad_bpp, count * self.opt_bpp, 0.0,
                          self.config.reserve_bytes)

    def microbatch_bytes(self, start: int, end: int, mb: int) -> float:
        """Activation bytes one in-flight microbatch pins on a stage holding [start, end)."""
        saved, out = self.activation_tables(mb)
        return sum(saved[start:end]) + out[end - 1]

    def stage(self, start: int, end: int, mb: int, inflight: int) -> RankMemory:
        """Peak memory of a stage holding [start, end) with `inflight` microbatches alive."""
        st = self.static(start, end)
        act = inflight * self.microbatch_bytes(start, end, mb)
        return RankMemory(st.params, st.grads, st.optimizer, act, st.reserve)


def plan_memory(plan: Plan, model: MemoryModel) -> dict[int, RankMemory]:
    """Peak memory of every rank of a `Plan` by the schedule formula."""
    out: dict[int, RankMemory] = {}
    for pipe in plan.pipelines:
        p, m = len(pipe.stages), len(pipe.microbatches)
        for s, st in enumerate(pipe.stages):
            k = inflight_microbatches(plan.schedule, p, s, m)
            out[st.rank] = model.stage(st.start, st.end, plan.microbatch_size, k)
    return out


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


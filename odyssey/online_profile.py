"""A profile measured by the running job itself, from the timings in commit votes.

Each rank reports, with its vote, how long its forward and backward took per
microbatch and layer, each layer's share of the stage's forward time (layers timed one
by one on CPU; the backward is split by the same shares; without shares, evenly), its
layers' parameter counts, and the bytes each layer saved for backward per microbatch
(`profiler.saved_bytes`; not reported while Chameleon swaps on that rank). The leader
folds these into EWMAs per layer (per step, the fastest rank that ran the layer), so
when it must plan a recovery it has a current, real-machine profile without stopping to
measure (online calibration of the cost model).
"""

from __future__ import annotations

from profiler.profile import LayerProfile, Profile
from profiler.synthetic import loopback_comm


def stage_timing(op_seconds: dict[str, float], start: int, end: int, microbatches: int,
                 param_counts: list[int], saved_bytes: list[float] | None = None,
                 layer_fwd_s: list[float] | None = None) -> dict:
    """The timing part of a vote: per-layer, per-microbatch forward/backward seconds
    (the stage's mean), (when measured) per-layer saved bytes per microbatch, and
    (when each layer's forward was timed) each layer's share of the stage's time."""
    n = max(1, (end - start) * microbatches)
    out = {"start": start, "end": end, "fwd_s": op_seconds.get("forward", 0.0) / n,
           "bwd_s": op_seconds.get("backward", 0.0) / n, "params": param_counts}
    if saved_bytes is not None:
        out["saved"] = saved_bytes
    total = sum(layer_fwd_s or ())
    if layer_fwd_s and len(layer_fwd_s) == end - start and total > 0:
        out["shares"] = [t / total for t in layer_fwd_s]
    return out


class OnlineProfile:
    """EWMA of per-layer timings reported in votes."""

    def __init__(self, num_layers: int, alpha: float = 0.3):
        self.num_layers = num_layers
        self.alpha = alpha
        self.fwd: list[float | None] = [None] * num_layers
        self.bwd: list[float | None] = [None] * num_layers
        self.params: list[int] = [0] * num_layers
        self.saved: list[float | None] = [None] * num_layers
        """Bytes saved for backward per microbatch (the latest report: it is a size)."""

    def observe(self, timing: dict) -> None:
        """Fold one stage's timing in."""
        self.observe_step([timing])

    def observe_step(self, timings: list[dict]) -> None:
        """Fold one committed step's timings in: per layer, the fastest of the ranks that
        ran it (replicas in other pipelines): the profile is a layer's cost at full
        speed, and a straggler not found yet would otherwise inflate its layers, and so
        every prediction with them, by its slowdown."""
        best: dict[int, tuple[float, float]] = {}
        for timing in timings:
            n = timing["end"] - timing["start"]
            shares = timing.get("shares")
            if shares is None or len(shares) != n:
                shares = [1.0 / n] * n  # the stage's time spread evenly
            for j, i in enumerate(range(timing["start"], timing["end"])):
                # a layer's part of the stage's time: its share of the timed forward (the
                # backward split the same way: roughly proportional, not timed per layer)
                scale = n * shares[j]
                value = (timing["fwd_s"] * scale, timing["bwd_s"] * scale)
                if i not in best or sum(value) < sum(best[i]):
                    best[i] = value
                if j < len(timing["params"]):
                    self.params[i] = int(timing["params"][j])
                if j < len(timing.get("saved", ())):
                    self.saved[i] = float(timing["saved"][j])
        for i, (fwd, bwd) in best.items():
            for table, value in ((self.fwd, fwd), (self.bwd, bwd)):
                old = table[i]
                table[i] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    def to_profile(self, model_name: str, microbatch_size: int, activation_bytes: float
                   ) -> Profile:
        """Layers never observed (no step committed yet) get 1 ms forward, 2 ms backward:
        only relative costs matter for the choice then. A layer's activation bytes are
        its measured saved bytes, else `activation_bytes` (the boundary activation);
        its output bytes are always the boundary."""
        layers = [
            LayerProfile(index=i, name="layer", param_count=self.params[i],
                         param_bytes=4 * self.params[i],
                         forward_s=[1e-3 if self.fwd[i] is None else self.fwd[i]],
                         backward_s=[2e-3 if self.bwd[i] is None else self.bwd[i]],
                         activation_bytes=[activation_bytes if self.saved[i] is None
                                           else self.saved[i]],
                         output_bytes=[activation_bytes])
            for i in range(self.num_layers)
        ]
        return Profile(kind="measured", device={"name": "this job (online, from commit votes)"},
                       config={"source": "commit votes (EWMA)"}, model=model_name,
                       microbatch_sizes=[microbatch_size], layers=layers,
                       comm=loopback_comm()).check()

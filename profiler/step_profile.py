"""What one profiled training step looked like, as plain data (no torch).

`OpMonitor` (profiler/op_monitor.py) records these while a step runs; Chameleon's swap
policy and timeline (planner/swap_policy.py, planner/swap_timeline.py) read them, and so
does the planner when it prices swapping for a recovery plan from per-layer profile
figures (planner/memory.py), which is why they live below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

StageId = tuple[int, int]
"""(microbatch index within the step, layer slot)."""


def shape_class(shape: Sequence[int]) -> tuple[int, int]:
    """Tolerant shape class: (ndim, ceil(log2(numel))). Small length changes often keep it."""
    n = 1
    for s in shape:
        n *= s
    return (len(shape), max(0, (n - 1).bit_length()))


class TensorKey(NamedTuple):
    """Tolerant identity of a saved tensor, stable across steps with small shape changes.

    `kind` is the producer's autograd node name (the consuming node is not visible in a
    pack hook; for a view, the producer of its base); `index` counts tensors of that kind
    saved so far in the stage. A NamedTuple: cheap to build and hash on the hot path.
    """

    stage: StageId
    kind: str
    index: int
    shape_class: tuple[int, int]
    dtype: str

    def structural(self) -> tuple:
        """The key without its shape class (second-chance match after a shape change)."""
        return (self.stage, self.kind, self.index, self.dtype)


@dataclass
class SavedRecord:
    """Detailed facts about one saved storage in one step (times in seconds from step
    start, with the executor's own stalls removed)."""

    rid: int
    """Position in pack order."""
    key: TensorKey
    """Tolerant key used to match policies."""
    nbytes: int
    """Bytes of the underlying storage."""
    pack_t: float
    """When it was saved."""
    unpack_t: float | None = None
    """First unpack in backward (None: never unpacked)."""
    last_unpack_t: float | None = None
    """Last unpack in backward."""
    unpack_order: int | None = None
    """Rank of the first unpack among all unpacks of the step."""
    free_t: float | None = None
    """When the last reference from autograd died (None: after the step)."""
    recompute: str | None = None
    """Pointwise op that recomputes it from its producer's saved input, if any."""
    recompute_src: int | None = None
    """rid of the record holding that input."""
    aliased: bool = False
    """True if its storage stayed alive elsewhere after the executor dropped it, so
    swapping it frees nothing."""


@dataclass
class StepProfile:
    """What one step looked like."""

    step: int
    """Step counter of the monitor."""
    detailed: bool
    """Whether `records` were collected."""
    step_time: float
    """Seconds from step start to step end, stalls removed."""
    signatures: dict[StageId, tuple[int, int]]
    """Per forward stage: (number of saved tensors, hash of shapes and dtypes)."""
    fwd_t: dict[StageId, float]
    """First entry time of each forward stage."""
    bwd_t: dict[StageId, float]
    """Start time of each stage's backward."""
    records: list[SavedRecord] = field(default_factory=list)
    """Detailed records in pack order (empty in light mode)."""
    stall_s: float = 0.0
    """Time the executor reported as its own waiting, removed from the timestamps."""

    def signature(self) -> int:
        """One hash over all stage signatures (used to cache policies)."""
        return hash(tuple(sorted(self.signatures.items())))

    def changed_stages(self, other: StepProfile | None) -> list[StageId]:
        """Stages whose signature differs from `other` (all of them if other is None)."""
        if other is None:
            return sorted(self.signatures)
        keys = set(self.signatures) | set(other.signatures)
        return sorted(k for k in keys if self.signatures.get(k) != other.signatures.get(k))

    def saved_bytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stage ids become "mb:slot" strings)."""
        d = asdict(self)
        for name in ("signatures", "fwd_t", "bwd_t"):
            d[name] = {f"{k[0]}:{k[1]}": v for k, v in getattr(self, name).items()}
        return d

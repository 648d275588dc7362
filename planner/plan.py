"""`Plan`: who holds which layers and trains which microbatches.

A plan is plain data (JSON round-trip, no torch). Ranks are *worker ids*: the stable
global rank a worker was launched with. They stay the same across generations, so a
recovery plan can name the survivors without renumbering them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

SCHEDULES = ("gpipe", "1f1b")


class PlanError(ValueError):
    """A plan that cannot run; the message names the layer, rank or microbatch at fault."""


@dataclass(frozen=True)
class Stage:
    """One rank's share of a pipeline."""

    rank: int
    """Worker id that executes this stage."""
    start: int
    """First layer index held (inclusive)."""
    end: int
    """One past the last layer index held (exclusive)."""

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass
class Pipeline:
    """A chain of stages that together hold every layer once."""

    stages: list[Stage]
    """Stages in layer order: stage 0 holds layer 0, the last stage the last layer."""
    microbatches: list[int]
    """Microbatch ids this pipeline trains each step, in schedule order."""

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.stages]


@dataclass(frozen=True)
class _Index:
    """Rank and layer lookups of one plan, built once (see `Plan._index`)."""

    where: dict[int, tuple[int, int]]
    """Worker id -> (pipeline, stage) of its first appearance."""
    holders: list[tuple[int, ...]]
    """Layer -> sorted worker ids holding it."""
    ranks: tuple[int, ...]
    """Sorted worker ids."""
    num_stages: int
    """Stages over all pipelines (a shared stage counts once per pipeline it serves)."""

    @classmethod
    def of(cls, plan: Plan) -> _Index:
        where: dict[int, tuple[int, int]] = {}
        holders: list[set[int]] = [set() for _ in range(max(plan.num_layers, 0))]
        num_stages = 0
        for pi, p in enumerate(plan.pipelines):
            num_stages += len(p.stages)
            for si, s in enumerate(p.stages):
                where.setdefault(s.rank, (pi, si))
                for layer in range(max(s.start, 0), min(s.end, len(holders))):
                    holders[layer].add(s.rank)
        return cls(where, [tuple(sorted(h)) for h in holders], tuple(sorted(where)),
                   num_stages)


@dataclass
class Plan:
    """A complete training plan: data-parallel pipelines over a layered model.

    Lookups (`stage`, `stage_of`, `holders`, `has_rank`, `ranks`) are O(1) through an
    index built on first use. Assigning a field drops it; after editing the pipelines in
    place (e.g. replacing a stage), call `validate()`, which re-indexes.
    """

    num_layers: int
    """Number of layers of the model (layers are addressed 0..num_layers-1)."""
    num_microbatches: int
    """Microbatches per step; their ids are 0..num_microbatches-1."""
    microbatch_size: int
    """Samples per microbatch; global batch = num_microbatches * microbatch_size."""
    pipelines: list[Pipeline] = field(default_factory=list)
    """Data-parallel replicas; they may differ in length and in microbatch count."""
    schedule: str = "1f1b"
    """Pipeline schedule: 'gpipe' or '1f1b'."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        self.__dict__.pop("_lookup", None)  # the stages may have moved

    @property
    def _index(self) -> _Index:
        idx = self.__dict__.get("_lookup")
        if idx is None:
            idx = self.__dict__["_lookup"] = _Index.of(self)
        return idx

    # ---- derived views -------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.num_microbatches * self.microbatch_size

    @property
    def ranks(self) -> list[int]:
        """Worker ids, sorted (a new list; use `has_rank` to test membership)."""
        return list(self._index.ranks)

    @property
    def world_size(self) -> int:
        return len(self._index.ranks)

    def has_rank(self, rank: int) -> bool:
        return rank in self._index.where

    def stage_of(self, rank: int) -> tuple[int, int]:
        """(pipeline index, stage index) of a worker id (its first pipeline if shared)."""
        try:
            return self._index.where[rank]
        except KeyError:
            raise PlanError(f"rank {rank} is not in the plan (ranks: {self.ranks})") from None

    def holders(self, layer: int) -> list[int]:
        """Worker ids holding `layer`, sorted (none for a layer outside the model)."""
        holders = self._index.holders
        return list(holders[layer]) if 0 <= layer < len(holders) else []

    def stage(self, rank: int) -> Stage:
        """The stage a worker id executes (shared stages have one range everywhere)."""
        pi, si = self.stage_of(rank)
        return self.pipelines[pi].stages[si]

    @property
    def has_shared_stages(self) -> bool:
        """True when some rank serves several pipelines (a rerouted plan)."""
        idx = self._index
        return idx.num_stages > len(idx.ranks)

    def layer_groups(self) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
        """Maximal contiguous layer ranges with one holder set: ((start, end), holders).

        Gradients of each range are all-reduced among its holders.
        """
        holders = self._index.holders
        out: list[tuple[tuple[int, int], tuple[int, ...]]] = []
        start = 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or holders[layer] != holders[start]:
                out.append(((start, layer), holders[start]))
                start = layer
        return out

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> Plan:
        """Raise `PlanError` naming exactly what is wrong; return self when valid.

        Also rebuilds the lookup index, so a plan edited in place is looked up afresh."""
        self.__dict__.pop("_lookup", None)
        errors: list[str] = []
        if self.num_layers < 1:
            errors.append(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_microbatches < 1:
            errors.append(f"num_microbatches must be >= 1, got {self.num_microbatches}")
        if self.microbatch_size < 1:
            errors.append(f"microbatch_size must be >= 1, got {self.microbatch_size}")
        if self.schedule not in SCHEDULES:
            errors.append(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not self.pipelines:
            errors.append("plan has no pipelines")
        # A rank executes one stage. It may serve several pipelines with that same stage
        # (a shared stage: how a rerouted plan sends a lost stage's microbatches to a
        # peer), but never twice in one pipeline or with different layer ranges.
        ranges: dict[int, set[tuple[int, int]]] = {}
        for p in self.pipelines:
            for st in p.stages:
                ranges.setdefault(st.rank, set()).add((st.start, st.end))
        for r in sorted(ranges):
            if r < 0:
                errors.append(f"rank {r} is negative")
            if len(ranges[r]) > 1:
                errors.append(f"rank {r} is used with different layer ranges "
                              f"{sorted(ranges[r])} (a rank executes one stage)")
        for pi, p in enumerate(self.pipelines):
            for r, n in sorted(Counter(p.ranks).items()):
                if n > 1:
                    errors.append(f"pipeline {pi}: rank {r} is used {n} times")
        for pi, p in enumerate(self.pipelines):
            if not p.stages:
                errors.append(f"pipeline {pi} has no stages")
                continue
            if not p.microbatches:
                errors.append(f"pipeline {pi} has no microbatches")
            held: dict[int, list[int]] = {}
            for s in p.stages:
                if not 0 <= s.start < s.end <= self.num_layers:
                    errors.append(
                        f"pipeline {pi}: rank {s.rank} has layer range [{s.start}, {s.end}) "
                        f"outside [0, {self.num_layers}) or empty"
                    )
                    continue
                for layer in s.layers:
                    held.setdefault(layer, []).append(s.rank)
            holes = [layer for layer in range(self.num_layers) if layer not in held]
            for a, b in runs_of(holes):
                what = f"layer {a} is" if a == b else f"layers {a}..{b} are"
                errors.append(f"pipeline {pi}: {what} held by no rank (hole)")
            for layer in range(self.num_layers):
                owners = held.get(layer, [])
                if len(owners) > 1:
                    errors.append(
                        f"pipeline {pi}: layer {layer} is held by ranks {owners} (overlap)"
                    )
            for a, b in zip(p.stages, p.stages[1:]):
                if b.start < a.start:
                    errors.append(
                        f"pipeline {pi}: stages out of layer order (rank {b.rank} starts at "
                        f"layer {b.start} after rank {a.rank} at layer {a.start})"
                    )
        mb_uses = Counter(m for p in self.pipelines for m in p.microbatches)
        for m, n in sorted(mb_uses.items()):
            if not 0 <= m < self.num_microbatches:
                errors.append(
                    f"microbatch {m} is out of range [0, {self.num_microbatches})"
                )
            elif n > 1:
                owners = [pi for pi, p in enumerate(self.pipelines) if m in p.microbatches]
                errors.append(f"microbatch {m} is duplicated ({n} times, pipelines {owners})")
        missing = [m for m in range(self.num_microbatches) if m not in mb_uses]
        if missing:
            errors.append(f"microbatch(es) {missing} are missing (trained by no pipeline)")
        if errors:
            raise PlanError("invalid plan:\n  - " + "\n  - ".join(errors))
        return self

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        try:
            pipelines = [
                Pipeline(
                    stages=[Stage(int(s["rank"]), int(s["start"]), int(s["end"]))
                            for s in p["stages"]],
                    microbatches=[int(m) for m in p["microbatches"]],
                )
                for p in d["pipelines"]
            ]
            return cls(
                num_layers=int(d["num_layers"]),
                num_microbatches=int(d["num_microbatches"]),
                microbatch_size=int(d["microbatch_size"]),
                pipelines=pipelines,
                schedule=str(d.get("schedule", "1f1b")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan JSON: {type(e).__name__}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"malformed plan JSON: {e}") from e
        return cls.from_dict(d)

    # ---- constructors --------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        num_layers: int,
        dp: int,
        pp: int,
        num_microbatches: int,
        microbatch_size: int,
        schedule: str = "1f1b",
        ranks: list[int] | None = None,
        partition: list[int] | None = None,
    ) -> Plan:
        """`dp` identical pipelines of `pp` stages; microbatches dealt round-robin.

        `partition` gives the layer count of each stage (defaults to an even split);
        ranks are assigned pipeline-major: pipeline i holds ranks[i*pp:(i+1)*pp].
        """
        if dp < 1 or pp < 1:
            raise PlanError(f"dp and pp must be >= 1, got dp={dp} pp={pp}")
        if pp > num_layers:
            raise PlanError(f"pp={pp} stages cannot split {num_layers} layers")
        if num_microbatches < dp:
            raise PlanError(
                f"{num_microbatches} microbatches cannot feed {dp} pipelines"
            )
        ranks = list(range(dp * pp)) if ranks is None else list(ranks)
        if len(ranks) != dp * pp:
            raise PlanError(f"need {dp * pp} ranks for dp={dp} x pp={pp}, got {len(ranks)}")
        sizes = partition or even_partition(num_layers, pp)
        if len(sizes) != pp or sum(sizes) != num_layers or min(sizes) < 1:
            raise PlanError(
                f"partition {sizes} must have {pp} positive entries summing to {num_layers}"
            )
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        pipelines = []
        for i in range(dp):
            stages = [Stage(ranks[i * pp + s], bounds[s], bounds[s + 1]) for s in range(pp)]
            mbs = list(range(i, num_microbatches, dp))
            pipelines.append(Pipeline(stages, mbs))
        return cls(num_layers, num_microbatches, microbatch_size, pipelines, schedule).validate()


def even_partition(num_layers: int, parts: int) -> list[int]:
    """Layer counts per stage as even as possible (earlier stages get the remainder)."""
    base, extra = divmod(num_layers, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def runs_of(values: list[int]) -> list[tuple[int, int]]:
    """Collapse sorted ints into inclusive (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs

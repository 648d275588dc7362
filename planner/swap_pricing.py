"""What swapping activations costs a plan, priced by Chameleon's own policy and timeline.

A rank whose plan does not fit keeps `budget` saved bytes resident. Its step, as
Chameleon's timeline sees it, is built from the per-layer profile (`rank_step`): its
forwards and backwards in the order its schedule runs them, back to back (waits for
peers left out, so there is less compute to hide copies under than the real step has:
a conservative price), one saved record per layer and microbatch (the layer's saved
bytes, packed as its forward ends, needed when its backward starts, freed when that
ends; at scale consecutive layers merge, `MAX_RECORDS`). `generate_policy`
(planner/swap_policy.py, the generator Chameleon runs on the rank) chooses what to swap
and when to prefetch; its simulated stall is the step time the plan pays, and
`minimum_budget` (what `BudgetError.minimum` reports) is where the plan becomes
infeasible. One model: the price a recovery decision uses is the timeline Chameleon
then follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.program import Instruction, Op
from planner.swap_policy import Policy, PolicyConfig, generate_policy, minimum_budget
from profiler.step_profile import SavedRecord, StepProfile, TensorKey, shape_class

PRICING_POLICY = PolicyConfig(min_swap_bytes=0, recompute=False)
"""Per-layer aggregates: every record may move; recompute needs tensor-level facts."""


@dataclass(frozen=True)
class RankSwap:
    """Chameleon's plan for one rank at one budget, as the planner prices it."""

    stall_s: float
    """Step time lost waiting for copies (the timeline's stall)."""
    hidden_s: float
    """Copy time the timeline hid under compute (the busier lane's, less the stall)."""
    copied_bytes: float
    """Bytes moved to host and back per step."""
    peak_bytes: float
    """Saved bytes resident at the peak under the policy."""

    def exposed_s(self, overlap: float) -> float:
        """Step time the rank loses when its copies hide under only `overlap` of the
        compute the timeline let them hide under (1: the timeline as is)."""
        return self.stall_s + (1.0 - overlap) * self.hidden_s


MAX_RECORDS = 256
"""A rank's step has at most about this many records: past it, consecutive layers of a
stage merge into one record per microbatch (a policy over thousands of records costs
seconds per candidate at a thousand GPUs; small models keep one record per layer)."""


def rank_step(order: list[Instruction], saved: list[float], fwd_s: list[float],
              bwd_s: list[float], max_records: int = MAX_RECORDS) -> StepProfile:
    """One rank's step as a detailed `StepProfile` (see the module docstring)."""
    forwards = sum(1 for ins in order if ins.op is Op.FORWARD)
    per_fwd = max(1, max_records // max(forwards, 1))
    t = 0.0
    records: list[SavedRecord] = []
    open_: dict[tuple[int, int], SavedRecord] = {}
    fwd_t: dict[tuple[int, int], float] = {}
    bwd_t: dict[tuple[int, int], float] = {}
    for ins in order:
        if ins.op not in (Op.FORWARD, Op.BACKWARD):
            continue
        chunks = _chunks(ins.start, ins.end, per_fwd)
        if ins.op is Op.FORWARD:
            for a, b in chunks:
                stage = (ins.microbatch, a + 1)
                fwd_t[stage] = t
                t += sum(fwd_s[a:b])
                n = int(sum(saved[a:b]))
                if n > 0:
                    rec = SavedRecord(len(records), TensorKey(stage, "layer", 0,
                                                              shape_class([n]), "u8"), n, t)
                    records.append(rec)
                    open_[(ins.microbatch, a)] = rec
        else:
            for a, b in reversed(chunks):
                bwd_t[(ins.microbatch, a + 1)] = t
                rec = open_.pop((ins.microbatch, a), None)
                if rec is not None:
                    rec.unpack_t = rec.last_unpack_t = t
                t += sum(bwd_s[a:b])
                if rec is not None:
                    rec.free_t = t
    for k, rec in enumerate(sorted(records, key=lambda r: (r.unpack_t is None, r.unpack_t))):
        rec.unpack_order = k
    return StepProfile(step=0, detailed=True, step_time=t, signatures={}, fwd_t=fwd_t,
                       bwd_t=bwd_t, records=records)


def _chunks(start: int, end: int, most: int) -> list[tuple[int, int]]:
    """[start, end) cut into at most `most` runs of consecutive layers, evenly."""
    n = end - start
    k = min(n, most)
    cuts = [start + (n * i) // k for i in range(k + 1)]
    return list(zip(cuts, cuts[1:]))


def floor_bytes(step: StepProfile) -> float:
    """The least saved bytes the rank can run with: Chameleon's minimum budget."""
    return float(minimum_budget(step, PRICING_POLICY)) if step.records else 0.0


def price(step: StepProfile, budget: float, host_Bps: float) -> RankSwap:
    """Chameleon's policy for `step` at `budget` (>= `floor_bytes`), simulated."""
    if not step.records:
        return RankSwap(0.0, 0.0, 0.0, 0.0)
    pol: Policy = generate_policy(step, int(budget), host_Bps, host_Bps, PRICING_POLICY)
    p = pol.predicted
    busy = max(p.out_bytes, p.in_bytes) / host_Bps
    return RankSwap(p.stall_s, max(0.0, busy - p.stall_s), float(p.out_bytes + p.in_bytes),
                    float(p.peak_bytes))

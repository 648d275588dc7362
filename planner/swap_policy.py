"""Policy generator: which saved tensors to keep, swap or recompute, and when to prefetch.

Input: a detailed `StepProfile`, a budget, and measured copy bandwidth each way.
Greedy over the worst memory peak: simulate, take the tensors resident at the peak,
move the best candidates (recomputable pointwise outputs first, then the tensors with
the longest idle gap between save and use, which are easiest to hide) until the excess
is covered, repeat. Prefetches are scheduled as late as possible on the H2D lane
(backwards from each tensor's first use) and attached to the backward stage boundary
that precedes that start time. The final timeline is simulated with the executor's
guards to predict peak and stall.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

from planner.swap_timeline import KEEP, RECOMPUTE, SWAP, SimResult, need_times, simulate
from profiler.step_profile import StageId, StepProfile, TensorKey
from profiler.units import format_size


class BudgetError(RuntimeError):
    """The memory budget cannot be met even with every movable saved tensor swapped."""

    def __init__(self, budget: int, minimum: int, detail: str = "") -> None:
        self.budget, self.minimum = budget, minimum
        super().__init__(
            f"Chameleon budget {format_size(budget)} ({budget} B) cannot be met even with "
            f"every saved activation swapped: at least {format_size(minimum)} ({minimum} B) "
            f"must be resident{detail}. Raise the budget to >= {minimum} B.")


@dataclass
class PolicyConfig:
    """Knobs of the policy generator."""

    min_swap_bytes: int = 64 * 1024
    """Tensors below this size are always kept."""
    recompute: bool = True
    """Allow recomputing GELU/SiLU outputs from their saved input."""
    prefetch_slack: float = 0.1
    """Extra fraction of each copy's duration reserved when scheduling prefetch."""
    max_rounds: int = 200
    """Upper bound on greedy rounds."""
    recompute_Bps: float = 20e9
    """Assumed throughput of recomputing a pointwise op (bytes of output per second)."""


@dataclass
class Action:
    """What to do with one saved tensor."""

    mode: str
    """"keep", "swap" or "recompute"."""
    prefetch_stage: StageId | None = None
    """Backward stage whose start triggers the prefetch (None: fetch at first use)."""
    swap_out_start: float | None = None
    """Predicted start of the swap-out (s from step start)."""
    prefetch_start: float | None = None
    """Predicted start of the prefetch."""


@dataclass
class Policy:
    """Decisions for one step shape, matched to tensors by tolerant key."""

    budget: int
    """Budget the policy was generated for."""
    actions: dict[TensorKey, Action]
    """Exact key -> action."""
    predicted: SimResult
    """Simulated step with the executor's guards."""
    baseline_peak: int
    """Peak resident bytes with nothing swapped."""
    min_budget: int
    """Smallest budget this profile can run in."""
    bw_out: float
    """Device->host bandwidth used (B/s)."""
    bw_in: float
    """Host->device bandwidth used (B/s)."""
    generation: int = 0
    """Counter set by the manager."""
    structural: dict[tuple, Action] = field(default_factory=dict)
    """Key without shape class -> action (survives small shape changes)."""

    def __post_init__(self) -> None:
        if not self.structural:
            self.structural = {k.structural(): a for k, a in self.actions.items()}

    def lookup(self, key: TensorKey) -> tuple[Action | None, int]:
        """(action, match level): 2 exact, 1 structural, 0 no match."""
        a = self.actions.get(key)
        if a is not None:
            return a, 2
        a = self.structural.get(key.structural())
        return (a, 1) if a is not None else (None, 0)

    def summary(self) -> dict:
        counts = {KEEP: 0, SWAP: 0, RECOMPUTE: 0}
        for a in self.actions.values():
            counts[a.mode] += 1
        p = self.predicted
        return {"budget": self.budget, "baseline_peak": self.baseline_peak,
                "min_budget": self.min_budget, "predicted_peak": p.peak_bytes,
                "predicted_stall_s": p.stall_s, "swap_bytes": p.out_bytes,
                "recompute_bytes": p.recompute_bytes, "counts": counts,
                "bw_out": self.bw_out, "bw_in": self.bw_in}


def _eligible(profile: StepProfile, cfg: PolicyConfig) -> list[bool]:
    return [r.nbytes >= cfg.min_swap_bytes and not r.aliased for r in profile.records]


def _can_recompute(profile: StepProfile, rid: int, modes: list[str], cfg: PolicyConfig) -> bool:
    r = profile.records[rid]
    if not cfg.recompute or r.recompute is None or r.recompute_src is None:
        return False
    return modes[r.recompute_src] != RECOMPUTE and r.unpack_t is not None


def schedule_prefetch(profile: StepProfile, modes: list[str], bw_in: float,
                      slack: float = 0.1) -> list[StageId | None]:
    """As-late-as-possible H2D schedule, mapped to backward stage boundaries."""
    need = need_times(profile, modes)
    bounds = sorted((t, sid) for sid, t in profile.bwd_t.items())
    times = [t for t, _ in bounds]
    triggers: list[StageId | None] = [None] * len(profile.records)
    items = sorted((rid for rid, m in enumerate(modes) if m == SWAP and need[rid] is not None),
                   key=lambda rid: need[rid], reverse=True)  # type: ignore[arg-type, return-value]
    next_start = float("inf")
    for rid in items:
        dur = profile.records[rid].nbytes / bw_in * (1 + slack)
        end = min(need[rid], next_start)  # type: ignore[type-var]
        start = end - dur
        next_start = start
        i = bisect.bisect_right(times, start) - 1
        if i >= 0:
            triggers[rid] = bounds[i][1]
        elif bounds:
            triggers[rid] = bounds[0][1]
    return triggers


def minimum_budget(profile: StepProfile, cfg: PolicyConfig, recompute: bool = False) -> int:
    """Smallest budget accepted: simulated peak with every eligible tensor swapped
    (recomputed where possible if `recompute`), fetched just in time with instant copies,
    and every tensor that cannot move (tiny, or aliased) counted for the whole step, so
    the figure does not depend on the exact free times of tiny tensors. Recompute needs
    the output and its input on the device together; the all-swap minimum is lower."""
    elig = _eligible(profile, cfg)
    modes = [SWAP if e else KEEP for e in elig]
    for rid in range(len(modes)):
        if recompute and modes[rid] == SWAP and _can_recompute(profile, rid, modes, cfg):
            modes[rid] = RECOMPUTE
    recs = [r if e else replace(r, unpack_t=None, last_unpack_t=None, free_t=None)
            for r, e in zip(profile.records, elig)]
    held = replace(profile, records=recs)
    none: list[StageId | None] = [None] * len(modes)
    return simulate(held, modes, none, float("inf"), float("inf"),
                    recompute_Bps=float("inf")).peak_bytes


def generate_policy(profile: StepProfile, budget: int, bw_out: float, bw_in: float,
                    cfg: PolicyConfig | None = None) -> Policy:
    """Greedy over the worst peak. Raises BudgetError if the budget is below the minimum."""
    cfg = cfg or PolicyConfig()
    if not profile.detailed:
        raise ValueError("generate_policy needs a detailed profile")
    recs = profile.records
    n = len(recs)
    modes = [KEEP] * n
    none: list[StageId | None] = [None] * n
    baseline = simulate(profile, modes, none, bw_out, bw_in, recompute_Bps=cfg.recompute_Bps)
    min_b = minimum_budget(profile, cfg)
    if budget < min_b:
        biggest = max((r.nbytes for r in recs), default=0)
        raise BudgetError(budget, min_b, f" (largest saved tensor {format_size(biggest)}, "
                                         f"{len(recs)} saved tensors)")
    if cfg.recompute and budget < minimum_budget(profile, cfg, recompute=True):
        cfg = replace(cfg, recompute=False)  # too tight for output + input together
    elig = _eligible(profile, cfg)
    triggers = none
    for _ in range(cfg.max_rounds):
        triggers = schedule_prefetch(profile, modes, bw_in, cfg.prefetch_slack)
        res = simulate(profile, modes, triggers, bw_out, bw_in, recompute_Bps=cfg.recompute_Bps)
        excess = res.peak_bytes - budget
        if excess <= 0:
            break
        cands = [rid for rid in res.at_peak if modes[rid] == KEEP and elig[rid]]
        if not cands:
            break  # the peak is made of in-flight copies: the executor's guards handle it

        def score(rid: int) -> tuple:
            r = recs[rid]
            gap = (r.unpack_t if r.unpack_t is not None else profile.step_time * 2) - r.pack_t
            return (_can_recompute(profile, rid, modes, cfg), gap, r.nbytes)

        cands.sort(key=score, reverse=True)
        freed = 0
        for rid in cands:
            modes[rid] = RECOMPUTE if _can_recompute(profile, rid, modes, cfg) else SWAP
            freed += recs[rid].nbytes
            if freed >= excess:
                break
    triggers = schedule_prefetch(profile, modes, bw_in, cfg.prefetch_slack)
    pred = simulate(profile, modes, triggers, bw_out, bw_in, budget=budget,
                    recompute_Bps=cfg.recompute_Bps)
    actions = {}
    for r in recs:
        m = modes[r.rid]
        actions[r.key] = Action(m, triggers[r.rid] if m == SWAP else None,
                                pred.out_start.get(r.rid), pred.in_start.get(r.rid))
    return Policy(budget, actions, pred, baseline.peak_bytes, min_b, bw_out, bw_in)

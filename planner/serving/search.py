"""Serving configuration search and GPU-loss re-configuration.

For N GPUs, every layout replicas x (tp, pp) is scored by the highest request rate at
which the simulated trace (`planner.serving.simulate_layout`) still meets the TTFT and
TPOT percentile targets (doubling, then bisection on the rate). The best layout serves
the highest rate; when no layout meets the targets even at the lowest rate, `SLOError`
names the best achievable latencies.

Losing a GPU reuses the training recovery machinery (`planner.recovery`): each option is
a `RecoveryCandidate` (its `plan` maps replicas to pipelines, pipeline stages to PP
stages, a stage's rank being its TP group's first GPU), scored as requests served within
the SLO over the horizon, and `recovery.choose` picks one. Kinds: *reroute* keeps the
intact replicas and sends the broken replica's traffic to them (no state moves);
*reparallelize* re-lays the N-1 survivors out (each GPU reloads its weight shard).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from planner.plan import Pipeline, Plan, Stage, even_partition
from planner.recovery import RecoveryCandidate, RecoveryConfig, choose
from planner.serving.batching import SchedulerConfig, TraceConfig, generate_requests
from planner.serving.estimator import (
    DoesNotFitError,
    ServingCostConfig,
    ServingCostModel,
    ServingLayout,
    SLOError,
    simulate_trace,
    split_round_robin,
)
from profiler.serving import ServingProfile


@dataclass(frozen=True)
class SLOConfig:
    """Latency targets a configuration must meet."""

    ttft_s: float = 0.5
    """Time-to-first-token target at the percentile, seconds."""
    tpot_s: float = 0.05
    """Time-per-output-token target at the percentile, seconds."""
    percentile: int = 90
    """Percentile both targets apply to."""


@dataclass(frozen=True)
class ServeSearchConfig:
    """What the serving search explores."""

    gpus: int = 8
    """GPUs available."""
    slo: SLOConfig = field(default_factory=SLOConfig)
    """Latency targets."""
    trace: TraceConfig = field(default_factory=lambda: TraceConfig(num_requests=120))
    """Request shape of the workload; its rate is what the search varies and its
    num_requests is per replica (a fleet trace has num_requests x replicas)."""
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batching limits of every replica."""
    cost: ServingCostConfig = field(default_factory=ServingCostConfig)
    """Memory per GPU and the inter-GPU link fit."""
    max_tp: int = 8
    """Largest tensor-parallel degree tried (powers of two dividing n_heads)."""
    max_pp: int = 4
    """Largest pipeline-parallel degree tried."""
    min_rate: float = 0.05
    """Lowest request rate tried (requests/s, whole fleet): the near-idle latency."""
    min_goodput: float = 0.9
    """A rate is sustainable only if a replica finishes its share at >= this fraction
    of the rate it is offered (a finite trace can hide a growing queue otherwise)."""
    bisect_steps: int = 6
    """Bisection steps after the doubling phase."""


@dataclass
class LayoutResult:
    """A layout's best sustainable rate and the latencies there."""

    layout: ServingLayout
    max_rate: float
    """Highest rate meeting the SLO (0 when even min_rate misses it)."""
    summary: dict
    """Trace summary at max_rate (or at min_rate when infeasible)."""

    def row(self, pct: int) -> str:
        s = self.summary
        return (f"{str(self.layout):>18} {self.max_rate:9.2f} "
                f"{s[f'ttft_p{pct}_s'] * 1e3:10.1f} {s[f'tpot_p{pct}_s'] * 1e3:10.2f}")


@dataclass
class ServeSearchResult:
    best: LayoutResult
    results: list[LayoutResult]

    def table(self, pct: int) -> str:
        head = f"{'layout':>18} {'max rps':>9} {f'TTFT p{pct}':>8}ms {f'TPOT p{pct}':>8}ms"
        rows = sorted(self.results, key=lambda r: -r.max_rate)
        return "\n".join([head, *(r.row(pct) for r in rows)])


def candidate_layouts(gpus: int, profile: ServingProfile, max_tp: int = 8,
                      max_pp: int = 4) -> list[ServingLayout]:
    """Every replicas x tp x pp using at most `gpus` (as many replicas as fit)."""
    if gpus < 1:
        raise ValueError(f"need at least one GPU, got {gpus}")
    heads, blocks = profile.model["n_heads"], profile.model["n_blocks"]
    out = []
    tp = 1
    while tp <= min(max_tp, gpus) and heads % tp == 0:
        for pp in range(1, min(max_pp, blocks) + 1):
            if tp * pp <= gpus:
                out.append(ServingLayout(gpus // (tp * pp), tp, pp))
        tp *= 2
    return out


def evaluate_layout(profile: ServingProfile, layout: ServingLayout,
                    cfg: ServeSearchConfig) -> LayoutResult:
    """Highest fleet rate at which `layout` meets the SLO (0 if none)."""
    pct = cfg.slo.percentile

    cost = ServingCostModel(profile, layout.tp, layout.pp, cfg.cost)

    def run(rate: float) -> tuple[bool, dict]:
        # replicas are identical and get every r-th request: simulate replica 0's share
        fleet = generate_requests(replace(cfg.trace, rate=rate,
                                          num_requests=cfg.trace.num_requests * layout.replicas))
        share = split_round_robin(fleet, layout.replicas)[0]
        s = simulate_trace(share, cost, cfg.sched).summary((pct,))
        offered = len(share) / max(share[-1].arrival_s, 1e-12)
        s["goodput_fraction"] = s["throughput_rps"] / offered
        ok = (s[f"ttft_p{pct}_s"] <= cfg.slo.ttft_s and s[f"tpot_p{pct}_s"] <= cfg.slo.tpot_s
              and s["goodput_fraction"] >= cfg.min_goodput)
        return ok, s

    ok, s = run(cfg.min_rate)
    if not ok:
        return LayoutResult(layout, 0.0, s)
    lo, lo_s = cfg.min_rate, s
    hi = None
    while hi is None and lo < 1e6:
        ok, s = run(lo * 2)
        if ok:
            lo, lo_s = lo * 2, s
        else:
            hi = lo * 2
    for _ in range(cfg.bisect_steps if hi else 0):
        mid = (lo + hi) / 2
        ok, s = run(mid)
        if ok:
            lo, lo_s = mid, s
        else:
            hi = mid
    return LayoutResult(layout, lo, lo_s)


def search_serving(profile: ServingProfile, cfg: ServeSearchConfig,
                   layouts: list[ServingLayout] | None = None) -> ServeSearchResult:
    """Best layout for `cfg.gpus` GPUs; raises `SLOError` when none meets the targets."""
    layouts = layouts or candidate_layouts(cfg.gpus, profile, cfg.max_tp, cfg.max_pp)
    results = []
    for lay in layouts:
        try:
            results.append(evaluate_layout(profile, lay, cfg))
        except DoesNotFitError:
            continue
    if not results:
        raise SLOError(f"no layout of {cfg.gpus} GPU(s) fits the model in "
                       f"{cfg.cost.memory_bytes_per_gpu / 2**30:.2f} GiB per GPU")
    feasible = [r for r in results if r.max_rate > 0]
    pct = cfg.slo.percentile
    if not feasible:
        def excess(r: LayoutResult) -> float:
            return max(r.summary[f"ttft_p{pct}_s"] / cfg.slo.ttft_s,
                       r.summary[f"tpot_p{pct}_s"] / cfg.slo.tpot_s)
        b = min(results, key=excess)
        raise SLOError(
            f"no configuration of {cfg.gpus} GPU(s) meets TTFT p{pct} <= "
            f"{cfg.slo.ttft_s * 1e3:.1f} ms and TPOT p{pct} <= {cfg.slo.tpot_s * 1e3:.2f} ms, "
            f"even at {cfg.min_rate:g} req/s; best achievable: TTFT p{pct} "
            f"{b.summary[f'ttft_p{pct}_s'] * 1e3:.1f} ms, TPOT p{pct} "
            f"{b.summary[f'tpot_p{pct}_s'] * 1e3:.2f} ms with {b.layout}")
    best = max(feasible, key=lambda r: (r.max_rate, -r.layout.gpus,
                                        -r.summary[f"ttft_p{pct}_s"]))
    return ServeSearchResult(best, results)


# ---- GPU loss ---------------------------------------------------------------------------
def layout_plan(layout: ServingLayout, num_layers: int, gpu_ids: list[int]) -> Plan:
    """A serving layout as a `Plan`: replica -> pipeline, PP stage -> stage whose rank is
    its TP group's first GPU (the group holds gpu_ids[rank .. rank + tp))."""
    if len(gpu_ids) < layout.gpus:
        raise ValueError(f"{layout} needs {layout.gpus} GPUs, got {len(gpu_ids)}")
    sizes = [0, *even_partition(num_layers, layout.pp)]
    bounds = [sum(sizes[: i + 1]) for i in range(layout.pp + 1)]
    pipelines = []
    g = iter(sorted(gpu_ids))
    for r in range(layout.replicas):
        stages = []
        for s in range(layout.pp):
            group = [next(g) for _ in range(layout.tp)]
            stages.append(Stage(group[0], bounds[s], bounds[s + 1]))
        pipelines.append(Pipeline(stages, [r]))
    return Plan(num_layers, layout.replicas, 1, pipelines).validate()


@dataclass(frozen=True)
class ServeRecoveryConfig:
    """How a serving re-configuration is scored."""

    horizon_s: float = 600.0
    """Expected time until the next change; score = requests served within it."""
    weight_load_Bps: float = 2e9
    """Bandwidth at which a GPU (re)loads its weight shard."""
    rebuild_s: float = 1.0
    """Fixed cost of any change (drain, router update, group rebuild)."""


def plan_gpu_loss(profile: ServingProfile, cfg: ServeSearchConfig, current: ServingLayout,
                  lost_gpu: int, rc: ServeRecoveryConfig | None = None
                  ) -> tuple[RecoveryCandidate, list[RecoveryCandidate]]:
    """Best re-configuration after GPU `lost_gpu` of `current` (GPUs 0..gpus-1) fails."""
    rc = rc or ServeRecoveryConfig()
    if not 0 <= lost_gpu < current.gpus:
        raise ValueError(f"GPU {lost_gpu} is not in the layout's GPUs 0..{current.gpus - 1}")
    layers = profile.model["n_blocks"] + 2
    survivors = [g for g in range(cfg.gpus) if g != lost_gpu]
    broken = lost_gpu // current.gpus_per_replica
    options: list[tuple[str, ServingLayout, list[int], float, str]] = []
    if current.replicas > 1:
        per = current.gpus_per_replica
        keep = [g for g in range(current.gpus) if g // per != broken]
        options.append(("reroute", replace(current, replicas=current.replicas - 1), keep,
                        rc.rebuild_s, f"replica {broken} drained, traffic to the others"))
    for lay in candidate_layouts(len(survivors), profile, cfg.max_tp, cfg.max_pp):
        load = profile.param_bytes / lay.gpus_per_replica / rc.weight_load_Bps
        options.append(("reparallelize", lay, survivors, rc.rebuild_s + load,
                        f"re-laid out as {lay}"))
    cands = []
    for kind, lay, gpus, transition, note in options:
        res = evaluate_layout(profile, lay, cfg)
        c = RecoveryCandidate(kind, layout_plan(lay, layers, gpus),
                              predicted_transition_s=transition,
                              predicted_step_s=1.0 / res.max_rate if res.max_rate else
                              float("inf"), note=f"{note}; max {res.max_rate:.2f} req/s")
        c.score = res.max_rate * max(0.0, rc.horizon_s - transition)
        cands.append(c)
    best = choose(cands, RecoveryConfig(policy="adaptive", horizon_s=rc.horizon_s))
    if best.score <= 0:
        raise SLOError(f"after losing GPU {lost_gpu}, no configuration of "
                       f"{len(survivors)} GPU(s) meets the SLO")
    return best, cands

"""Run every policy of the cluster simulator over one trace: table, JSON, PNG plots.

This is what `odyssey simulate` (launch/simulate.py) and benchmarks/cluster_scale.py
call: a model (GPT-class by formula, or a profile file), a cluster, a trace file or a
synthetic MTBF trace, and the policies; the initial plan is the plan search's best for
the ranks up at t=0 (pipeline-major, so a failure domain holds whole stages of few
pipelines), and the failure-free reference is the best plan for the whole cluster.
With `SimConfig.device_memory`, both plans fit that capacity by the memory model the
recovery candidates are checked with, and `memory_table` adds what memory did: plans
swapping, swap time, plans over budget. With fail-slow episodes `straggler_table` adds
what they cost and what the adaptive policy's mitigation did.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from planner.cluster.membership import ClusterConfig, Membership
from planner.cluster.policies import SIM_POLICIES
from planner.cluster.predict import Predictor
from planner.cluster.results import PolicyResult
from planner.cluster.sim import SimConfig, TransitionConfig, simulate_trace
from planner.cluster.traces import (
    TraceEvent,
    initial_nodes,
    load_trace,
    merge,
    poisson_trace,
    straggler_trace,
)
from planner.cost import CostConfig, CostModel
from planner.memory import peak_memory
from planner.plan import Pipeline, Plan, PlanError, Stage
from planner.search import SearchConfig, search
from profiler.profile import Profile
from profiler.synthetic import FormulaConfig, formula_profile
from profiler.units import GiB


@dataclass(frozen=True)
class ModelConfig:
    """The model trained and its batch."""

    preset: str = "gpt3-6.7b"
    """GPT-3-like preset for the formula profile (A100-class device assumed)."""
    profile: str | None = None
    """Profile JSON (from `odyssey profile`) used instead of the formula."""
    global_batch: int = 512
    """Samples per step."""
    microbatch_sizes: tuple[int, ...] = (1, 2, 4)
    """Microbatch sizes the plan search tries."""
    memory_limit_gib: float = 80.0
    """Device memory per GPU the plan search fits the initial plan in (with
    `--device-memory` set, at most that capacity)."""


@dataclass(frozen=True)
class TraceConfig:
    """Where the events come from: a trace file, or synthetic failures."""

    trace: str | None = None
    """`ms,add|remove,nodeN` file (Bamboo/Oobleck format); None: synthetic Poisson."""
    mtbf_hours: float = 2.5
    """Synthetic: mean hours between interruptions per `mtbf_gpus` GPUs."""
    mtbf_gpus: int = 1000
    """Synthetic: the GPU count that rate is quoted for."""
    repair_hours: float = 1.0
    """Synthetic: a failed node is back (repaired / replaced) after this long."""
    days: float = 7.0
    """Synthetic: trace length."""
    straggler_gap_hours: float | None = None
    """Mean hours between fail-slow episodes (None: none)."""
    straggler_factor: float = 2.0
    """Slowdown of a fail-slow node."""
    straggler_hours: float = 0.5
    """Length of a fail-slow episode."""
    seed: int = 0
    """Random seed of the synthetic events."""


def load_model(cfg: ModelConfig, cluster: ClusterConfig) -> CostModel:
    prof = (Profile.load(cfg.profile) if cfg.profile
            else formula_profile(FormulaConfig(preset=cfg.preset)))
    return CostModel(prof, CostConfig(ranks_per_node=cluster.gpus_per_node))


def build_events(cfg: TraceConfig, cluster: ClusterConfig) -> tuple[list[TraceEvent], str]:
    """The trace to replay and a one-line description of it."""
    domains = cluster.world_size // cluster.trace_node_gpus
    if cfg.trace:
        events, what = load_trace(cfg.trace), f"trace {cfg.trace}"
    else:
        node_mtbf_s = cfg.mtbf_hours * 3600 * cfg.mtbf_gpus / cluster.trace_node_gpus
        events = poisson_trace(domains, cfg.days * 86400, node_mtbf_s,
                               cfg.repair_hours * 3600, cfg.seed)
        what = (f"synthetic: 1 interruption / {cfg.mtbf_hours:g} h / {cfg.mtbf_gpus} GPUs, "
                f"repair {cfg.repair_hours:g} h, {cfg.days:g} days, seed {cfg.seed}")
    if cfg.straggler_gap_hours:
        end = max(e.time_s for e in events) if len(events) > domains else cfg.days * 86400
        events = merge(events, straggler_trace(domains, end, cfg.straggler_gap_hours * 3600,
                                               cfg.straggler_hours * 3600,
                                               cfg.straggler_factor, cfg.seed + 1))
        what += (f"; fail-slow x{cfg.straggler_factor:g} for {cfg.straggler_hours:g} h every "
                 f"~{cfg.straggler_gap_hours:g} h")
    if not any(e.time_s <= 0 for e in events):
        events = merge(initial_nodes(domains), events)
    return events, what


def best_plan(cost: CostModel, ranks: list[int], model: ModelConfig,
              gpus_per_node: int, capacity_bytes: float = math.inf) -> Plan:
    """The plan search's best plan for `ranks` (pipeline-major), relabelled onto them.

    When whole nodes are up the search sees the real topology; otherwise it runs on
    len(ranks) ranks of one node (all links intra-node, optimistic) and the relabelled
    plan is then timed with the real node layout by the simulator. With a finite
    `capacity_bytes` the search's limit is at most that, lowered (a few times at most)
    until the plan's peak by `planner.memory.peak_memory` (which counts communication
    buffers the search does not) fits: a job starts with a plan that fits."""
    limit = min(model.memory_limit_gib * GiB, capacity_bytes)
    plan = _searched(cost, ranks, model, gpus_per_node, limit)
    for _ in range(4):
        over = peak_memory(plan, cost.memory).max_bytes - capacity_bytes
        if over <= 0:
            break
        limit -= over
        plan = _searched(cost, ranks, model, gpus_per_node, limit)
    return plan


def _searched(cost: CostModel, ranks: list[int], model: ModelConfig, gpus_per_node: int,
              limit_bytes: float) -> Plan:
    n = len(ranks)
    nodes, rpn = (n // gpus_per_node, gpus_per_node) if n % gpus_per_node == 0 else (1, n)
    sc = SearchConfig(num_nodes=nodes, ranks_per_node=rpn, memory_limit_bytes=limit_bytes,
                      global_batch=model.global_batch,
                      microbatch_sizes=model.microbatch_sizes, placements=("pipeline-major",))
    plan = search(cost.profile, sc).best.plan
    rel = dict(zip(plan.ranks, sorted(ranks)))
    return Plan(plan.num_layers, plan.num_microbatches, plan.microbatch_size,
                [Pipeline([Stage(rel[s.rank], s.start, s.end) for s in p.stages],
                          list(p.microbatches)) for p in plan.pipelines],
                plan.schedule).validate()


def run_policies(model: ModelConfig, cluster: ClusterConfig, trace: TraceConfig,
                 transitions: TransitionConfig, sim: SimConfig,
                 policies: tuple[str, ...] = SIM_POLICIES,
                 variants: Sequence[tuple[str, str, SimConfig]] | None = None) -> dict:
    """Simulate every policy; return a JSON-ready dict with results and the setup.

    `variants`: (label, policy, config) runs instead of `policies`, e.g. adaptive with
    and without memory awareness; they share the initial plan and step-time cache, so
    their configs must agree with `sim` on the predictor, step factor and device memory
    (the memory awareness and swap fields may differ)."""
    t0 = time.perf_counter()
    cost = load_model(model, cluster)
    events, what = build_events(trace, cluster)
    mship = Membership(cluster)
    for e in events:
        if e.time_s <= 0:
            mship.apply(e)
    up = mship.members()
    if not up:
        raise PlanError("no GPU is up at t=0 in the trace")
    cap = sim.capacity_bytes()
    full = best_plan(cost, list(range(cluster.world_size)), model, cluster.gpus_per_node, cap)
    plan = full if len(up) == cluster.world_size else best_plan(cost, up, model,
                                                                  cluster.gpus_per_node, cap)
    limit = min(model.memory_limit_gib * GiB, cap)
    predict = Predictor(cost, sim.predictor, sim.step_factor, limit)  # shared cache
    ff = full.global_batch / predict(full)
    if sim.duration_s is None and not trace.trace:
        sim = replace(sim, duration_s=trace.days * 86400)
    refs: dict[int, float] = {}

    def ff_for(members: list[int]) -> float:
        # failure-free reference for this many GPUs: the search's best plan for them
        if len(members) not in refs:
            best = best_plan(cost, list(members), model, cluster.gpus_per_node, cap)
            refs[len(members)] = best.global_batch / predict(best)
        return refs[len(members)]

    runs = [(name, name, sim) for name in policies] if variants is None else [
        (label, name, replace(cfg, duration_s=sim.duration_s)) for label, name, cfg in variants]
    results: list[PolicyResult] = []
    for label, name, cfg in runs:
        same = (cfg.predictor, cfg.step_factor, cfg.capacity_bytes())
        if same != (sim.predictor, sim.step_factor, cap):
            raise PlanError(f"variant {label!r}: predictor, step factor and device memory "
                            f"must match the shared setup's")
        t = time.perf_counter()
        r = simulate_trace(name, plan, cost, events, cluster, transitions, cfg,
                           ff_samples_per_s=ff, ff_for=ff_for,
                           memory_limit_bytes=limit, predictor=predict)
        r.policy = label
        r.notes.append(f"wall {time.perf_counter() - t:.2f} s")
        results.append(r)
    peak = peak_memory(plan, cost.memory)
    return {"setup": {"model": asdict(model), "profile": cost.profile.model,
                      "cluster": asdict(cluster), "trace": asdict(trace), "events": what,
                      "num_events": len(events), "up_at_start": len(up),
                      "transitions": asdict(transitions), "sim": asdict(sim),
                      "initial_plan": _shape(plan), "full_plan": _shape(full),
                      "capacity_bytes": None if cap == math.inf else cap,
                      "initial_peak_bytes": peak.max_bytes,
                      "ff_samples_per_s": ff, "elapsed_s": time.perf_counter() - t0},
            "results": results}


def _shape(plan: Plan) -> str:
    lens: dict[int, int] = {}
    for p in plan.pipelines:
        lens[len(p.stages)] = lens.get(len(p.stages), 0) + 1
    pp = " + ".join(f"{n}x{k}" for k, n in sorted(lens.items(), reverse=True))
    return f"{plan.world_size} ranks, pipelines {pp} stages, {plan.num_microbatches} x mb " \
           f"{plan.microbatch_size}"


def table(out: dict, baseline: str = "adaptive") -> str:
    """Markdown table of the results (throughput relative to `baseline`); with a device
    memory, followed by `memory_table`; with slow nodes, by `straggler_table`."""
    res: list[PolicyResult] = out["results"]
    ref = next((r for r in res if r.policy == baseline), None)
    head = ("| policy | avg samples/s | adaptive / policy | time to N (h) | goodput | "
            "post-recovery vs failure-free | transitions | fallbacks | lost work (h) | "
            "stalled (h) | samples dropped |")
    lines = [head, "|" + "---|" * 11]
    for r in res:
        rel = ref.samples_per_s / r.samples_per_s if ref and r.samples_per_s else float("nan")
        ttn = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s / 3600:.2f}"
        post = "-" if r.post_recovery_ratio is None else f"{r.post_recovery_ratio:.1%}"
        lines.append(f"| {r.policy} | {r.samples_per_s:.2f} | {rel:.2f}x | {ttn} | "
                     f"{r.goodput:.1%} | {post} | {r.transitions} | {r.fallbacks} | "
                     f"{r.lost_work_s / 3600:.2f} | {r.stall_s / 3600:.2f} | "
                     f"{r.samples_dropped:.3g} |")
    if out["setup"].get("capacity_bytes") is not None:  # --device-memory
        cap = out["setup"]["capacity_bytes"] / GiB
        lines += ["", f"Device memory: {cap:.1f} GiB per GPU after the reserve; plans over "
                      "it without swapping would OOM.", "", memory_table(out, baseline)]
    if any(r.slowed_s > 0 for r in res):  # the trace has fail-slow episodes
        lines += ["", straggler_table(out)]
    return "\n".join(lines)


def straggler_table(out: dict) -> str:
    """Markdown table of what slow nodes cost each run and what mitigating them did
    (detection by the live detector, re-plans by the live mitigation; adaptive only)."""
    lines = ["| run | slowed (h) | stragglers found | detection delay mean / max (s) "
             "| clearing delay mean (s) | mitigations (drops) | re-plans back "
             "| their stall (s) |",
             "|" + "---|" * 8]
    for r in out["results"]:
        found, gone = r.detection_delay_s, r.clear_delay_s
        det = f"{sum(found) / len(found):.1f} / {max(found):.1f}" if found else "-"
        clear = f"{sum(gone) / len(gone):.1f}" if gone else "-"
        lines.append(f"| {r.policy} | {r.slowed_s / 3600:.2f} | {len(found)} | {det} | "
                     f"{clear} | {r.mitigations} ({r.drops}) | {r.replans_back} | "
                     f"{r.mitigation_stall_s:.1f} |")
    return "\n".join(lines)


def memory_table(out: dict, baseline: str | None = None) -> str:
    """Markdown table of what device memory did to each run (throughput relative to
    `baseline`, default the first run)."""
    res: list[PolicyResult] = out["results"]
    ref = next((r for r in res if r.policy == baseline), res[0] if res else None)
    lines = [f"| run | avg samples/s | {ref.policy if ref else '-'} / run | goodput | changes "
             "| reroute / redundant / reparallelize / restart | memory dropped a candidate "
             "| fallbacks (for memory) | with swapping | swap time (h) "
             "| over budget: plans, h, GPU-h | largest peak (GiB) |",
             "|" + "---|" * 12]
    for r in res:
        rel = ref.samples_per_s / r.samples_per_s if ref and r.samples_per_s else float("nan")
        kinds = " / ".join(str(r.kinds.get(k, 0))
                           for k in ("reroute", "redundant", "reparallelize", "restart"))
        over = (f"**{r.over_budget}, {r.over_budget_s / 3600:.2f}, "
                f"{r.over_budget_gpu_h:.0f}**" if r.over_budget else "0")
        lines.append(f"| {r.policy} | {r.samples_per_s:.2f} | {rel:.2f}x | {r.goodput:.1%} | "
                     f"{r.transitions} | {kinds} | {r.memory_dropped} | "
                     f"{r.fallbacks} ({r.memory_fallbacks}) | {r.swapping} | "
                     f"{r.swap_time_s / 3600:.2f} | {over} | {r.peak_bytes / GiB:.1f} |")
    return "\n".join(lines)


def save(out: dict, folder: str | Path, name: str) -> list[Path]:
    """Write `name`.json, `name`-timeline.png and `name`-bars.png under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res: list[PolicyResult] = out["results"]
    js = folder / f"{name}.json"
    js.write_text(json.dumps({"setup": out["setup"], "results": [r.row() for r in res]},
                             indent=1, default=str))
    return [js, *plot(out, folder, name)]


def binned(r: PolicyResult, bins: int) -> tuple[list[float], list[float]]:
    """Bin edges and the average samples/s trained in each bin (checkpoints and
    transitions included as zero)."""
    width = r.duration_s / bins
    avg = [0.0] * bins
    for s in r.segments:
        if s.samples_per_s <= 0:
            continue
        i = int(s.t0 // width)
        while i < bins and i * width < s.t1:
            lo, hi = max(s.t0, i * width), min(s.t1, (i + 1) * width)
            avg[i] += s.samples_per_s * max(hi - lo, 0.0) / width
            i += 1
    return [i * width for i in range(bins + 1)], avg


def plot(out: dict, folder: Path, name: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res: list[PolicyResult] = out["results"]
    hours, bins = 3600.0, 300
    fig, axes = plt.subplots(len(res), 1, figsize=(11, 1.6 * len(res) + 1), sharex=True,
                             sharey=True, squeeze=False)
    for ax, r in zip(axes[:, 0], res):
        edges, avg = binned(r, bins)
        ax.stairs(avg, [e / hours for e in edges], fill=True, alpha=0.8)
        for t, what in r.events:
            color = {"-": "red", "~": "orange"}.get(what[:1], "green")
            ax.axvline(t / hours, color=color, lw=0.4, alpha=0.5)
        ax.set_ylabel(r.policy, rotation=0, ha="right", fontsize=8)
        ax.axhline(out["setup"]["ff_samples_per_s"], color="gray", ls=":", lw=0.8)
    axes[-1, 0].set_xlabel(f"hours (samples/s averaged over 1/{bins} of the run; red: loss, "
                           "green: arrival, orange: straggler re-plan; dotted: failure-free)")
    fig.suptitle(f"samples/s over time -- {out['setup']['events']}", fontsize=9)
    fig.tight_layout()
    p1 = folder / f"{name}-timeline.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r.policy for r in res], [r.samples_per_s for r in res])
    ax.axhline(out["setup"]["ff_samples_per_s"], color="gray", ls=":", label="failure-free")
    ax.set_ylabel("average samples/s")
    ax.legend(fontsize=8)
    ax.set_title(name, fontsize=9)
    fig.tight_layout()
    p2 = folder / f"{name}-bars.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]

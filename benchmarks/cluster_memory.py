"""Cluster-scale simulation with device memory (issue 17): what memory awareness and swap
change at 32, 256 and 1024 GPUs. **Modelled, nothing runs.**

The same scenarios as benchmarks/cluster_scale.py (GPT-3 6.7B-like model by formula,
A100-class compute; 32 GPUs over the Bamboo p3 spot trace, 256 and 1024 GPUs over 7 days
of Poisson failures), with a per-GPU device memory every plan is checked against. Runs:

- adaptive, memory-aware, swap priced (`--device-memory D --swap`), and the same
  without two-phase candidates (`adaptive-one-phase`, what adaptive was before them);
- adaptive, memory-aware, no swap: an unfit candidate is dropped, so it picks another
  plan or restarts (the kinds it chose are counted), or, when no candidate fits, runs
  over budget (counted);
- adaptive, memory-unaware (`--no-memory-aware`, the behaviour before memory was
  checked): plans over budget are counted, with their GPU-hours;
- each fixed policy (reroute, redundant, reparallelize, restart), memory-aware with
  swap: its kind runs swapping where it must, and falls back to the best candidate
  where even swapping cannot fit (counted).

    python benchmarks/cluster_memory.py      # 64GB at 32/256/1024, 48GB at 32/256 GPUs
    python benchmarks/cluster_memory.py --device-memory 80GB --only gpu32

Writes OUT/cluster_memory.json (all runs' rows and setups) and a summary JSON
(`--summary`, default benchmarks/results/cluster_memory.json); --out defaults to
runs/bench/ (docs/BENCHMARKS.md, "Where results go").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import out_dir  # noqa: E402
from planner.cluster.bench import (  # noqa: E402
    ModelConfig,
    TraceConfig,
    memory_table,
    run_policies,
)
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig  # noqa: E402
from profiler.units import GiB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
FIXED = ("reroute", "redundant", "reparallelize", "restart")


def scenarios(model: ModelConfig) -> dict[str, tuple]:
    synth = TraceConfig(mtbf_hours=2.5, mtbf_gpus=1000, repair_hours=1.0, days=7.0)
    return {
        "gpu32": (model, ClusterConfig(4, 8, 1),
                  TraceConfig(trace=str(TRACES / "bamboo-p3-trace.csv"))),
        "gpu256": (replace(model, global_batch=1024), ClusterConfig(32, 8, 8), synth),
        "gpu1024": (replace(model, global_batch=2048), ClusterConfig(128, 8, 8), synth),
    }


def variants(base: SimConfig) -> list[tuple[str, str, SimConfig]]:
    aware = replace(base, memory_aware=True, swap=True)
    return [("adaptive (aware, swap)", "adaptive", aware),
            ("adaptive one-phase (aware, swap)", "adaptive-one-phase", aware),
            ("adaptive (aware, no swap)", "adaptive", replace(aware, swap=False)),
            ("adaptive (unaware)", "adaptive", replace(aware, memory_aware=False, swap=False)),
            *[(f"{k} (aware, swap)", k, aware) for k in FIXED]]


def summary_row(r) -> dict:
    return {"samples_per_s": r.samples_per_s, "goodput": r.goodput,
            "transitions": r.transitions, "kinds": r.kinds, "fallbacks": r.fallbacks,
            "memory_dropped": r.memory_dropped, "memory_fallbacks": r.memory_fallbacks,
            "swapping": r.swapping, "swap_time_h": r.swap_time_s / 3600,
            "over_budget": r.over_budget, "over_budget_h": r.over_budget_s / 3600,
            "over_budget_gpu_h": r.over_budget_gpu_h, "peak_gib": r.peak_bytes / GiB}


# (device memory, scenarios): 64 GB is the headline (see docs/BENCHMARKS.md for why);
# 48 GB, where after a loss no fresh plan fits without swapping, at the two fast scales
DEFAULT_RUNS = (("64GB", ("gpu32", "gpu256", "gpu1024")), ("48GB", ("gpu32", "gpu256")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    ap.add_argument("--preset", default="gpt3-6.7b", help="GPT-3-like model preset")
    ap.add_argument("--device-memory", default=None,
                    help="device memory per GPU (default: 64GB, then 48GB at 32/256 GPUs)")
    ap.add_argument("--out", default=str(out_dir()))
    ap.add_argument("--summary", default=str(ROOT / "benchmarks" / "results"
                                             / "cluster_memory.json"))
    args = ap.parse_args(argv)
    runs = DEFAULT_RUNS if args.device_memory is None else (
        (args.device_memory, tuple(scenarios(ModelConfig()))),)
    full = {"load_before": os.getloadavg(), "runs": {}}
    summary = {"modelled": True, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python benchmarks/cluster_memory.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "model": asdict(ModelConfig(preset=args.preset)), "runs": {}}
    t_all = time.perf_counter()
    for device, names in runs:
        base = SimConfig(device_memory=device)
        for name, (model, cluster, trace) in scenarios(ModelConfig(preset=args.preset)).items():
            if name not in names or (args.only and name not in args.only):
                continue
            if trace.trace and not Path(trace.trace).is_file():
                print(f"== {name}: skipped, {trace.trace} not found")
                continue
            key = f"{device}/{name}"
            print(f"== {key}: simulating {len(variants(base))} runs "
                  f"({time.perf_counter() - t_all:.0f} s so far) ...", flush=True)
            t0 = time.perf_counter()
            out = run_policies(model, cluster, trace, TransitionConfig(), base,
                               variants=variants(base))
            wall = time.perf_counter() - t0
            s = out["setup"]
            print(f"   {s['profile']} on {cluster.world_size} GPUs; {s['events']} "
                  f"({s['num_events']} events); initial plan {s['initial_plan']}, peak "
                  f"{s['initial_peak_bytes'] / GiB:.1f} GiB of {s['capacity_bytes'] / GiB:.1f}"
                  f" GiB; {wall:.1f} s (load {os.getloadavg()[0]:.1f})")
            print(memory_table(out))
            for r in out["results"]:
                print(f"   {r.policy}: " + "; ".join(r.notes))
            full["runs"][key] = {"wall_s": wall, "setup": s,
                                 "results": [r.row() for r in out["results"]]}
            summary["runs"][key] = {
                "device_memory": device, "capacity_gib": s["capacity_bytes"] / GiB,
                "gpus": cluster.world_size, "global_batch": model.global_batch,
                "events": s["events"], "trace_events": s["num_events"],
                "initial_plan": s["initial_plan"],
                "initial_peak_gib": s["initial_peak_bytes"] / GiB, "wall_s": wall,
                "results": {r.policy: summary_row(r) for r in out["results"]}}
    summary["wall_s"] = time.perf_counter() - t_all
    dest = Path(args.out) / "cluster_memory.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(full, indent=1, default=str))
    Path(args.summary).write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {dest} and {args.summary} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster-scale failure-trace simulation: adaptive vs the baselines at 32/256/1024 GPUs.

Scenarios (GPT-3 6.7B-like model by formula, A100-class GPUs assumed; nothing runs,
compute is modelled by the planner's cost model):

- 32 GPUs (4 nodes x 8), one GPU per trace node: the Bamboo p3 spot trace and the
  Oobleck synthetic 1 h trace (read from ../shared/traces/ when present; the file
  replayed is named in the output; skipped when absent);
- 256 and 1024 GPUs (8 GPUs per failure domain), 7 days of Poisson failures at one
  interruption per 2.5 h per 1,000 GPUs, each repaired after 1 h.

    python benchmarks/cluster_scale.py                      # all scenarios
    python benchmarks/cluster_scale.py --only p3 oobleck-1h

Writes OUT/cluster_scale.json and OUT/cluster_scale/NAME.{json,png}; --out defaults to
runs/bench/ (docs/BENCHMARKS.md, "Where results go").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import out_dir  # noqa: E402
from planner.cluster.bench import ModelConfig, TraceConfig, run_policies, save, table  # noqa: E402
from planner.cluster.policies import SIM_POLICIES  # noqa: E402
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
POLICIES = (*SIM_POLICIES[:2], "reroute+bf", *SIM_POLICIES[2:])


def scenarios(model: ModelConfig) -> dict[str, tuple]:
    small = ClusterConfig(num_nodes=4, gpus_per_node=8, trace_node_gpus=1)
    synth = TraceConfig(mtbf_hours=2.5, mtbf_gpus=1000, repair_hours=1.0, days=7.0)
    return {
        "p3": (model, small, TraceConfig(trace=str(TRACES / "bamboo-p3-trace.csv"))),
        "oobleck-1h": (model, small, TraceConfig(trace=str(TRACES / "oobleck-synthetic-1h.csv"))),
        "gpu256": (replace(model, global_batch=1024), ClusterConfig(32, 8, 8), synth),
        "gpu1024": (replace(model, global_batch=2048), ClusterConfig(128, 8, 8), synth),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    ap.add_argument("--preset", default="gpt3-6.7b", help="GPT-3-like model preset")
    ap.add_argument("--out", default=str(out_dir()))
    args = ap.parse_args(argv)
    out_all = {"load_before": os.getloadavg(), "scenarios": {}}
    for name, (model, cluster, trace) in scenarios(ModelConfig(preset=args.preset)).items():
        if args.only and name not in args.only:
            continue
        if trace.trace and not Path(trace.trace).is_file():
            print(f"== {name}: skipped, {trace.trace} not found")
            continue
        t0 = time.perf_counter()
        out = run_policies(model, cluster, trace, TransitionConfig(), SimConfig(), POLICIES)
        wall = time.perf_counter() - t0
        s = out["setup"]
        print(f"== {name}: {s['profile']} on {cluster.num_nodes} x {cluster.gpus_per_node} "
              f"GPUs; {s['events']} ({s['num_events']} events, {s['up_at_start']} up at "
              f"start); initial plan {s['initial_plan']}; failure-free "
              f"{s['ff_samples_per_s']:.1f} samples/s; {wall:.1f} s for "
              f"{len(POLICIES)} policies (load {os.getloadavg()[0]:.1f})")
        print(table(out))
        for r in out["results"]:
            print(f"   {r.policy}: " + "; ".join(r.notes))
        paths = save(out, Path(args.out) / "cluster_scale", name)
        out_all["scenarios"][name] = {"wall_s": wall, "load": os.getloadavg(),
                                      **json.loads(paths[0].read_text())}
    dest = Path(args.out) / "cluster_scale.json"
    if args.only and dest.exists():  # keep the scenarios not re-run
        old = json.loads(dest.read_text()).get("scenarios", {})
        out_all["scenarios"] = {**old, **out_all["scenarios"]}
    dest.write_text(json.dumps(out_all, indent=1, default=str))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

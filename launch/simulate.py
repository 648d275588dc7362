"""Replay a failure trace over a long job at cluster scale, for every recovery policy.

Each event triggers the choice the live runtime would make (planner.recovery's
candidates, scores and choice, with the same cost model), charges its transition, then
runs at the predicted step time until the next event. Prints a table and writes JSON
plus PNG plots (throughput over time with events marked; average throughput bars).

    odyssey simulate --trace ../shared/traces/bamboo-p3-trace.csv --num-nodes 4
    odyssey simulate --num-nodes 128 --trace-node-gpus 8 --days 7 --mtbf-hours 2.5
    odyssey simulate --num-nodes 4 --days 1 --straggler-gap-hours 3 --out sim-out

Policies: adaptive (Odyssey), reroute (ReCycle-like), reroute+bf (with bubble filling),
reparallelize (Oobleck-like), redundant (Bamboo-like), restart (torchrun + checkpoints
at the Young/Daly interval), drop-replica (torchft-like). Compute is modelled, nothing
runs; see docs/cluster-simulator.md for the model and its simplifications.
"""

from __future__ import annotations

import argparse
import sys

from odyssey.config import add_dataclass_args, from_args
from planner.cluster.bench import ModelConfig, TraceConfig, run_policies, save, table
from planner.cluster.policies import SIM_POLICIES
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig
from planner.plan import PlanError
from profiler.profile import ProfileError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="odyssey simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(SIM_POLICIES),
                    choices=[*SIM_POLICIES, "reroute+bf"], help="policies to simulate")
    ap.add_argument("--out", default=None,
                    help="folder for NAME.json, NAME-timeline.png, NAME-bars.png")
    ap.add_argument("--name", default="simulate", help="file name stem under --out")
    for cls in (ModelConfig, ClusterConfig, TraceConfig, TransitionConfig, SimConfig):
        add_dataclass_args(ap, cls)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run_policies(from_args(ModelConfig, args), from_args(ClusterConfig, args),
                           from_args(TraceConfig, args), from_args(TransitionConfig, args),
                           from_args(SimConfig, args), tuple(args.policies))
    except (PlanError, ProfileError, ValueError) as e:
        print(f"odyssey simulate: {e}", file=sys.stderr)
        return 2
    s = out["setup"]
    print(f"{s['profile']} on {s['cluster']['num_nodes']} x {s['cluster']['gpus_per_node']} "
          f"GPUs; {s['events']} ({s['num_events']} events, {s['up_at_start']} GPUs up at "
          f"start)\ninitial plan: {s['initial_plan']}; failure-free {s['ff_samples_per_s']:.2f}"
          f" samples/s ({s['full_plan']}); simulated in {s['elapsed_s']:.1f} s")
    print(table(out))
    if args.out:
        for p in save(out, args.out, args.name):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

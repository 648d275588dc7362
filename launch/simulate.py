"""Replay a failure trace over a long job at cluster scale, for every recovery policy.

Each event triggers the choice the live runtime would make (planner.recovery's
candidates, scores and choice, with the same cost model), charges its transition, then
runs at the predicted step time until the next event. Prints a table and writes JSON
plus PNG plots (throughput over time with events marked; average throughput bars).

    odyssey simulate --trace ../shared/traces/bamboo-p3-trace.csv --num-nodes 4
    odyssey simulate --num-nodes 128 --trace-node-gpus 8 --days 7 --mtbf-hours 2.5
    odyssey simulate --num-nodes 4 --days 1 --straggler-gap-hours 3 --out sim-out

Policies: adaptive (Odyssey; adaptive-one-phase: without two-phase candidates; two-phase:
always reroute first and copy behind), reroute (ReCycle-like), reroute+bf (with bubble filling),
reparallelize (Oobleck-like), redundant (Bamboo-like), restart (torchrun + checkpoints
at the Young/Daly interval), drop-replica (torchft-like). Fail-slow nodes (a trace's
`slow` lines, --straggler-gap-hours) slow every policy; adaptive finds them with the
live straggler detector and re-plans around them (--no-mitigate-stragglers: it keeps
its plan, to see what that buys). Compute is modelled, nothing runs; see
docs/cluster-simulator.md for the model and its simplifications.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from planner.cluster.bench import ModelConfig, TraceConfig, run_policies, save, table
from planner.cluster.policies import SIM_POLICIES
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig
from planner.plan import PlanError
from profiler.configtree import ConfigParser, section
from profiler.profile import ProfileError

POLICY_CHOICES = (*SIM_POLICIES, "reroute+bf", "two-phase", "adaptive-one-phase")


@dataclass(frozen=True)
class SimulateCommand:
    """What `odyssey simulate` runs (the model, cluster, trace, transition and simulator
    sections' flags carry no namespace: --num-nodes, --trace, ...)."""

    policies: tuple[str, ...] = SIM_POLICIES
    """Policies to simulate, of adaptive, reroute, reroute+bf, reparallelize, redundant,
    restart, drop-replica, two-phase, adaptive-one-phase."""
    out: str = ""
    """Folder for NAME.json, NAME-timeline.png, NAME-bars.png (empty: print only)."""
    name: str = "simulate"
    """File name stem under --out."""
    model: ModelConfig = section(ModelConfig, flat=True)
    cluster: ClusterConfig = section(ClusterConfig, flat=True)
    trace: TraceConfig = section(TraceConfig, flat=True)
    transition: TransitionConfig = section(TransitionConfig, flat=True)
    sim: SimConfig = section(SimConfig, flat=True)

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICY_CHOICES]
        if unknown:
            raise ValueError(f"--policies: unknown {unknown}; choose from {POLICY_CHOICES}")


def build_parser() -> ConfigParser:
    return ConfigParser(SimulateCommand, prog="odyssey simulate", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    cmd = build_parser().parse_config(argv)
    try:
        out = run_policies(cmd.model, cmd.cluster, cmd.trace, cmd.transition, cmd.sim,
                           cmd.policies)
    except (PlanError, ProfileError, ValueError) as e:
        print(f"odyssey simulate: {e}", file=sys.stderr)
        return 2
    s = out["setup"]
    print(f"{s['profile']} on {s['cluster']['num_nodes']} x {s['cluster']['gpus_per_node']} "
          f"GPUs; {s['events']} ({s['num_events']} events, {s['up_at_start']} GPUs up at "
          f"start)\ninitial plan: {s['initial_plan']}; failure-free {s['ff_samples_per_s']:.2f}"
          f" samples/s ({s['full_plan']}); simulated in {s['elapsed_s']:.1f} s")
    print(table(out))
    if cmd.out:
        for p in save(out, cmd.out, cmd.name):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

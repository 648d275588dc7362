"""Plan-search and recovery-decision speed on a GPT-3-like layer table (formulas, no GPU).

Search targets (this repository's acceptance): 32 ranks <= 1 s, 256 ranks <= 3 s, 1024
ranks <= 10 s for the whole search (enumeration, partitions, closed forms, simulation of
the top-k shapes), wall clock. Recovery-decision targets (issue 17): 32 ranks <= 0.2 s,
1024 ranks <= 1 s for one rank lost from dp x 8 stages: every candidate built (optimal
stage assignment, transfer rounds, per-rank memory against `--memory-gb`), scored and
chosen, fresh plans' layers split by predicted time within the capacity (the
leader's partitioner built inside the timed part, as it is per decision), with the
step-time predictor of the live leader (`leader`: the event simulator
per candidate up to `odyssey.calibration.EVENT_UPTO_RANKS` ranks, the closed form above;
pipeline counts screened by `planner.placement.screen_with`) or of the cluster simulator
(`cluster`: closed form + shared-stage bound, cached by shape, its own length screen).
Prints one row per world size with wall and CPU time and the load average (a busy
shared machine inflates wall time); `--check` exits 1 when a target is missed.

    python benchmarks/plan_search_speed.py
    python benchmarks/plan_search_speed.py --only recovery --recovery-predictors leader,cluster
    python benchmarks/plan_search_speed.py --preset gpt3-175b --memory-gb 640 --check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odyssey.calibration import EVENT_UPTO_RANKS  # noqa: E402
from planner.cluster.predict import Predictor, layer_state_bytes  # noqa: E402
from planner.cost import CostConfig, CostModel  # noqa: E402
from planner.memory import SwapPricing  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.recovery import (  # noqa: E402
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
    choose,
    score,
)
from planner.search import SearchConfig, search  # noqa: E402
from planner.simulate import simulate_plan  # noqa: E402
from profiler.synthetic import FormulaConfig, formula_profile  # noqa: E402
from profiler.units import GiB, format_size  # noqa: E402

TARGETS = {32: 1.0, 256: 3.0, 1024: 10.0}
RECOVERY_TARGETS = {32: 0.2, 1024: 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt3-13b")
    ap.add_argument("--global-batch", type=int, default=1536, help="sequences per step")
    ap.add_argument("--microbatch-sizes", default="1,2,4")
    ap.add_argument("--memory-gb", type=float, default=80.0)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--worlds", default="32,256,1024")
    ap.add_argument("--repeats", type=int, default=3, help="timed searches per world")
    ap.add_argument("--schedules", default="1f1b")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--only", choices=("search", "recovery"), default=None,
                    help="run one of the two benchmarks (default: both)")
    ap.add_argument("--recovery-worlds", default="32,1024")
    ap.add_argument("--recovery-predictors", default="leader,cluster",
                    help="leader (the live leader's predictor) and/or cluster")
    ap.add_argument("--swap-GBps", type=float, default=12.0,
                    help="price swapping for candidates over the capacity at this host "
                         "bandwidth, as the live leader does with a finite capacity "
                         "(0: no swap pricing)")
    args = ap.parse_args(argv)

    mbs = tuple(int(x) for x in args.microbatch_sizes.split(","))
    prof = formula_profile(FormulaConfig(preset=args.preset, microbatch_sizes=mbs))
    rows, ok_all = [], True
    if args.only != "recovery":
        ok_all &= search_speed(args, prof, mbs, rows)
    if args.only != "search":
        ok_all &= recovery_speed(args, prof, rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": prof.model, "rows": rows}, indent=1))
    return 0 if ok_all or not args.check else 1


def search_speed(args: argparse.Namespace, prof, mbs: tuple[int, ...], rows: list) -> bool:
    print(f"model {prof.model}: {prof.num_layers} layers; global batch {args.global_batch}; "
          f"microbatch sizes {mbs}; {format_size(args.memory_gb * GiB)} per rank; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"{'ranks':>6} {'shapes':>7} {'fit':>5} {'sim':>4} {'median s':>9} {'min s':>7} "
          f"{'cpu s':>6} {'target':>7} {'ok':>3}  {'step s':>8} {'closed-form err':>15}  "
          "best shape")
    ok_all = True
    for world in (int(x) for x in args.worlds.split(",")):
        cfg = SearchConfig(num_nodes=max(1, world // args.ranks_per_node),
                           ranks_per_node=min(world, args.ranks_per_node),
                           memory_limit_bytes=args.memory_gb * GiB,
                           global_batch=args.global_batch, microbatch_sizes=mbs,
                           schedules=tuple(args.schedules.split(",")))
        times, cpu = [], []
        for _ in range(max(1, args.repeats)):
            t0, c0 = time.perf_counter(), time.process_time()
            res = search(prof, cfg)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        best = res.best
        med = statistics.median(times)
        target = TARGETS.get(world)
        ok = target is None or med <= target
        ok_all &= ok
        err = best.estimate_s / best.step_time_s - 1
        print(f"{world:>6} {res.considered:>7} {res.feasible:>5} {res.simulated:>4} "
              f"{med:>9.3f} {min(times):>7.3f} {statistics.median(cpu):>6.3f} "
              f"{target or float('nan'):>7.1f} "
              f"{'yes' if ok else 'NO':>3}  {best.step_time_s:>8.3f} {err:>+15.2%}  "
              f"{best.shape}")
        rows.append({"ranks": world, "seconds": times, "cpu_seconds": cpu, "median_s": med,
                     "target_s": target, "load_average": os.getloadavg()[0],
                     "ok": ok, "shapes": res.considered, "fit": res.feasible,
                     "simulated": res.simulated, "best": best.shape,
                     "predicted_step_s": best.step_time_s, "closed_form_s": best.estimate_s})
    return ok_all


def leader_predictor(cost: CostModel):
    """As `odyssey.calibration.StepTimeModel.simulator` (without its calibration)."""
    fast = Predictor(cost, "closed-form", 1.0)
    return lambda p: (simulate_plan(p, cost).step_time_s
                      if p.world_size <= EVENT_UPTO_RANKS else fast(p))


def recovery_speed(args: argparse.Namespace, prof, rows: list) -> bool:
    """One recovery decision per world and predictor (see the module docstring)."""
    cost = CostModel(prof, CostConfig(ranks_per_node=args.ranks_per_node))
    capacity = args.memory_gb * GiB
    swap = f"swap priced at {args.swap_GBps:g} GB/s" if args.swap_GBps > 0 else "no swap"
    print(f"\nrecovery decision: one rank lost from dp x 8 stages, 4 x dp microbatches, "
          f"capacity {format_size(capacity)}, {swap}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'ranks':>6} {'predictor':>9} {'cands':>5} {'dropped':>7} {'build s':>8} "
          f"{'score s':>8} {'median s':>9} {'cpu s':>6} {'target':>7} {'ok':>3}  chosen")
    ok_all = True
    for world in (int(x) for x in args.recovery_worlds.split(",")):
        dp = max(1, world // 8)
        plan = Plan.uniform(prof.num_layers, dp, min(8, world), 4 * dp, 1)
        ctx = RecoveryContext(plan, [r for r in plan.ranks if r != 5 % world], 10,
                              layer_state_bytes(cost), 5)
        for how in args.recovery_predictors.split(","):
            times, cpu, build = [], [], []
            for _ in range(max(1, args.repeats)):
                if how == "leader":
                    predict, by_len = leader_predictor(cost), None
                else:
                    pr = Predictor(cost, "closed-form", 1.0, capacity)
                    predict, by_len = pr, pr.by_length
                t0, c0 = time.perf_counter(), time.process_time()
                cands, dropped = build_candidates(
                    ctx, predict, predict_len=by_len, memory=cost.memory,
                    capacity_bytes=capacity,
                    swap=SwapPricing(args.swap_GBps * 1e9) if args.swap_GBps > 0 else None,
                    partitioner=cost.partitioner(plan.microbatch_size),
                    two_phase=True)  # as the live leader (RecoveryConfig.two_phase)
                build.append(time.perf_counter() - t0)
                score(cands, ctx, RecoveryConfig(), predict)
                chosen = choose(cands, RecoveryConfig())
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            med = statistics.median(times)
            target = RECOVERY_TARGETS.get(world)
            ok = target is None or med <= target
            ok_all &= ok
            b = statistics.median(build)
            print(f"{world:>6} {how:>9} {len(cands):>5} {len(dropped):>7} {b:>8.3f} "
                  f"{med - b:>8.3f} {med:>9.3f} {statistics.median(cpu):>6.3f} "
                  f"{target or float('nan'):>7.2f} {'yes' if ok else 'NO':>3}  "
                  f"{chosen.kind} {[len(p.stages) for p in chosen.plan.pipelines][:4]}"
                  f"{'...' if len(chosen.plan.pipelines) > 4 else ''}, "
                  f"{len(chosen.transfers)} transfers in "
                  f"{chosen.row()['transfer_rounds']} rounds, "
                  f"peak {format_size(chosen.peak_bytes)}")
            rows.append({"benchmark": "recovery", "ranks": world, "predictor": how,
                         "seconds": times, "cpu_seconds": cpu, "median_s": med,
                         "target_s": target, "load_average": os.getloadavg()[0], "ok": ok,
                         "candidates": len(cands), "dropped": dropped,
                         "chosen": chosen.row()})
    return ok_all


if __name__ == "__main__":
    sys.exit(main())

"""`odyssey plan`: search plans for a world and a batch, print the best, write one.

    odyssey plan --profile profile.json --nodes 2 --ranks-per-node 4 \
        --global-batch 64 --microbatch-sizes 1,2,4 --memory-gb 16 --out plan.json
    odyssey plan --formula gpt3-13b --nodes 128 --ranks-per-node 8 --global-batch 1536
"""

from __future__ import annotations

import argparse
import sys

from planner.memory import GiB, fmt_bytes
from planner.plan import PlanError
from planner.search import NoPlanFitsError, SearchConfig, search
from profiler.profile import Profile, ProfileError


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="odyssey plan", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="profile JSON written by `odyssey profile`")
    src.add_argument("--formula", metavar="PRESET",
                     help="GPT-3-like layer table from formulas, e.g. gpt3-13b")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=None, help="samples per step")
    ap.add_argument("--microbatch-sizes", type=_ints, default=(1,),
                    help="comma-separated sizes to try (default 1)")
    ap.add_argument("--num-microbatches", type=int, default=None,
                    help="fix the microbatch count instead of the global batch")
    ap.add_argument("--memory-gb", type=float, default=80.0, help="memory per rank, GiB")
    ap.add_argument("--reserve-gb", type=float, default=0.0,
                    help="per-rank overhead to keep free, GiB")
    ap.add_argument("--schedules", type=_strs, default=("1f1b",),
                    help="comma-separated: 1f1b,gpipe")
    ap.add_argument("--no-unequal", action="store_true",
                    help="only pipelines of equal length")
    ap.add_argument("--top", type=int, default=5, help="plans to print")
    ap.add_argument("--top-k", type=int, default=8, help="shapes to simulate")
    ap.add_argument("--out", default=None, help="write the best Plan as JSON here")
    ap.add_argument("--show-ranks", action="store_true",
                    help="print the per-rank breakdown of the best plan")
    return ap


def plan_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey plan`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.profile:
            prof = Profile.load(args.profile)
        else:
            from profiler.synthetic import FormulaConfig, formula_profile

            prof = formula_profile(FormulaConfig(preset=args.formula,
                                                 microbatch_sizes=args.microbatch_sizes))
        from planner.cost import CostConfig, CostModel
        from planner.memory import MemoryConfig

        rpn = args.ranks_per_node if args.nodes > 1 else None
        cost = CostModel(prof, CostConfig(ranks_per_node=rpn,
                                          memory=MemoryConfig(args.reserve_gb * GiB)))
        cfg = SearchConfig(
            num_nodes=args.nodes, ranks_per_node=args.ranks_per_node,
            memory_limit_bytes=args.memory_gb * GiB, global_batch=args.global_batch,
            microbatch_sizes=args.microbatch_sizes, num_microbatches=args.num_microbatches,
            schedules=args.schedules, unequal_pipelines=not args.no_unequal,
            top_k=args.top_k, max_results=args.top)
        result = search(cost, cfg)
    except NoPlanFitsError as e:
        print(f"odyssey plan: {e}", file=sys.stderr)
        return 3
    except (ProfileError, PlanError, ValueError) as e:
        print(f"odyssey plan: {e}", file=sys.stderr)
        return 2
    print(f"profile {prof.model} ({prof.kind}); world {cfg.world_size} ranks "
          f"({args.nodes} x {args.ranks_per_node}); memory limit "
          f"{fmt_bytes(cfg.memory_limit_bytes)}")
    print(f"searched {result.considered} shapes ({result.feasible} fit), simulated "
          f"{result.simulated}, in {result.elapsed_s:.2f} s")
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    best = result.best
    if args.show_ranks:
        print("best plan per rank (ms): compute / p2p / bubble / allreduce / optimizer, memory")
        for r, b in sorted(best.sim.ranks.items()):
            print(f"  rank {r:>4}: {b.compute_s * 1e3:9.2f} {b.p2p_s * 1e3:8.2f} "
                  f"{b.bubble_s * 1e3:9.2f} {b.allreduce_s * 1e3:8.2f} "
                  f"{b.optimizer_s * 1e3:7.2f}  {fmt_bytes(b.memory.total if b.memory else 0)}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(best.plan.to_json(indent=2))
        print(f"wrote {args.out}: {best.shape}, predicted step "
              f"{best.step_time_s * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())

"""`odyssey plan`: search plans for a world and a batch, print the best, write one.

    odyssey plan --profile profile.json --nodes 2 --ranks-per-node 4 \
        --global-batch 64 --microbatch-sizes 1,2,4 --memory-gb 16 --out plan.json
    odyssey plan --formula gpt3-13b --nodes 128 --ranks-per-node 8 --global-batch 1536
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from planner.cost import CostConfig, CostModel
from planner.memory import MemoryConfig
from planner.plan import PlanError
from planner.search import NoPlanFitsError, SearchConfig, search
from profiler.configtree import ConfigParser, section
from profiler.profile import Profile, ProfileError
from profiler.synthetic import FormulaConfig, formula_profile
from profiler.units import GiB, format_size


@dataclass(frozen=True)
class PlanCommand:
    """What `odyssey plan` searches, and what it prints or writes; the search's own
    options (world, batch, schedules, ...) are SearchConfig's, without a namespace."""

    profile: str = ""
    """Profile JSON written by `odyssey profile` (give this or --formula)."""
    formula: str = ""
    """GPT-3-like layer table from formulas instead of a profile, e.g. gpt3-13b."""
    memory_gb: float = 80.0
    """Memory per rank, GiB."""
    reserve_gb: float = 0.0
    """Per-rank overhead to keep free, GiB."""
    out: str = ""
    """Write the best Plan as JSON here."""
    show_ranks: bool = False
    """Print the per-rank breakdown of the best plan."""
    search: SearchConfig = section(SearchConfig, flat=True, exclude=("memory_limit_bytes",))

    def __post_init__(self) -> None:
        if bool(self.profile) == bool(self.formula):
            raise ValueError("give one of --profile or --formula")


ALIASES = {"nodes": "search.num_nodes", "top": "search.max_results",
           "unequal": "search.unequal_pipelines"}
"""The flag names `odyssey plan` has always used for these SearchConfig fields."""


def build_parser() -> ConfigParser:
    return ConfigParser(PlanCommand, aliases=ALIASES, prog="odyssey plan",
                        description=__doc__.split("\n")[0])


def plan_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey plan`; returns the exit status."""
    cmd = build_parser().parse_config(argv)
    try:
        if cmd.profile:
            prof = Profile.load(cmd.profile)
        else:
            prof = formula_profile(FormulaConfig(preset=cmd.formula,
                                                 microbatch_sizes=cmd.search.microbatch_sizes))
        rpn = cmd.search.ranks_per_node if cmd.search.num_nodes > 1 else None
        cost = CostModel(prof, CostConfig(ranks_per_node=rpn,
                                          memory=MemoryConfig(cmd.reserve_gb * GiB)))
        cfg = replace(cmd.search, memory_limit_bytes=cmd.memory_gb * GiB)
        result = search(cost, cfg)
    except NoPlanFitsError as e:
        print(f"odyssey plan: {e}", file=sys.stderr)
        return 3
    except (ProfileError, PlanError, ValueError) as e:
        print(f"odyssey plan: {e}", file=sys.stderr)
        return 2
    print(f"profile {prof.model} ({prof.kind}); world {cfg.world_size} ranks "
          f"({cfg.num_nodes} x {cfg.ranks_per_node}); memory limit "
          f"{format_size(cfg.memory_limit_bytes)}")
    print(f"searched {result.considered} shapes ({result.feasible} fit), simulated "
          f"{result.simulated}, in {result.elapsed_s:.2f} s")
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    best = result.best
    if cmd.show_ranks:
        print("best plan per rank (ms): compute / p2p / bubble / allreduce / optimizer, memory")
        for r, b in sorted(best.sim.ranks.items()):
            print(f"  rank {r:>4}: {b.compute_s * 1e3:9.2f} {b.p2p_s * 1e3:8.2f} "
                  f"{b.bubble_s * 1e3:9.2f} {b.allreduce_s * 1e3:8.2f} "
                  f"{b.optimizer_s * 1e3:7.2f}  {format_size(b.memory.total if b.memory else 0)}")
    if cmd.out:
        with open(cmd.out, "w") as fh:
            fh.write(best.plan.to_json(indent=2))
        print(f"wrote {cmd.out}: {best.shape}, predicted step "
              f"{best.step_time_s * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())

"""`odyssey plan-serve`: choose replicas x TP x PP for N GPUs to meet TTFT/TPOT targets.

    python examples/profile_serving.py --out serving_profile.json       # measure the tables once
    odyssey plan-serve --profile serving_profile.json --gpus 8 --ttft-ms 200 --tpot-ms 20
    odyssey plan-serve --profile serving_profile.json --gpus 8 --ttft-ms 200 --tpot-ms 20 \
        --lose-gpu 3                                  # and the re-configuration after a loss

Every layout is scored by the highest request rate at which a simulated trace (continuous
batching, the server's own scheduler) meets both targets at the percentile; the best is
printed with its predicted TTFT/TPOT p50/p90/p99 at that rate. TP/PP figures are model
predictions (the engine runs TP=PP=1 only). Exit status 3: no layout meets the targets
(the message names the best achievable latencies); 2: bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace

from planner.serving.batching import generate_requests
from planner.serving.estimator import ServingCostConfig, SLOError, simulate_layout
from planner.serving.search import (
    ServeRecoveryConfig,
    ServeSearchConfig,
    SLOConfig,
    plan_gpu_loss,
    search_serving,
)
from profiler.configtree import ConfigParser, section
from profiler.profile import LinkFit
from profiler.serving import ServingProfile, ServingProfileError
from profiler.units import GiB


@dataclass(frozen=True)
class PlanServeCommand:
    """What `odyssey plan-serve` searches (targets in ms, sizes in GiB and GB/s here; the
    search's own options are ServeSearchConfig's)."""

    profile: str
    """Serving profile JSON (examples/profile_serving.py)."""
    ttft_ms: float = 200.0
    """TTFT target at the percentile, ms."""
    tpot_ms: float = 20.0
    """TPOT target at the percentile, ms."""
    percentile: int = 90
    """Percentile both targets apply to."""
    memory_gb: float = 16.0
    """Memory per GPU, GiB."""
    reserve_gb: float = 0.0
    """Kept free per GPU, GiB."""
    link_alpha_us: float = 10.0
    """Inter-GPU latency per message, us (assumed)."""
    link_gbps: float = 100.0
    """Inter-GPU bandwidth, GB/s (assumed)."""
    lose_gpu: int | None = None
    """Also plan the re-configuration after this GPU fails."""
    weight_load_gbps: float = 2.0
    """Per-GPU weight (re)load bandwidth, GB/s."""
    json: str = ""
    """Also write the result here."""
    search: ServeSearchConfig = section(
        ServeSearchConfig, flat=True, exclude=("slo", "cost", "trace.rate"))
    recovery: ServeRecoveryConfig = section(ServeRecoveryConfig, flat=True,
                                            exclude=("weight_load_Bps",))

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"--percentile must be in (0, 100), got {self.percentile}")

    def search_config(self) -> ServeSearchConfig:
        """The search's config with the targets, memory and link of this command."""
        return replace(
            self.search, slo=SLOConfig(self.ttft_ms / 1e3, self.tpot_ms / 1e3, self.percentile),
            cost=ServingCostConfig(self.memory_gb * GiB, self.reserve_gb * GiB,
                                   LinkFit(self.link_alpha_us * 1e-6, self.link_gbps * 1e9,
                                           [], "assumed")))


ALIASES = {"requests": "search.trace.num_requests", "prompt-len": "search.trace.prompt_len",
           "output-len": "search.trace.output_len", "seed": "search.trace.seed",
           "max-batch-tokens": "search.sched.max_batch_tokens",
           "max-running": "search.sched.max_running"}
"""The flag names `odyssey plan-serve` has always used for the trace and batching fields."""


def build_parser() -> ConfigParser:
    return ConfigParser(PlanServeCommand, aliases=ALIASES, prog="odyssey plan-serve",
                        description=__doc__.split("\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="\n".join(__doc__.split("\n")[1:]))


def plan_serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey plan-serve`; returns the exit status."""
    cmd = build_parser().parse_config(argv)
    pct = cmd.percentile
    try:
        prof = ServingProfile.load(cmd.profile)
        cfg = cmd.search_config()
        res = search_serving(prof, cfg)
        best = res.best
        fleet = replace(cfg.trace, rate=best.max_rate,
                        num_requests=cfg.trace.num_requests * best.layout.replicas)
        final = simulate_layout(generate_requests(fleet), prof, best.layout, cfg.cost,
                                cfg.sched).summary()
        loss = None
        if cmd.lose_gpu is not None:
            rc = replace(cmd.recovery, weight_load_Bps=cmd.weight_load_gbps * 1e9)
            loss = plan_gpu_loss(prof, cfg, best.layout, cmd.lose_gpu, rc)
    except SLOError as e:
        print(f"odyssey plan-serve: {e}", file=sys.stderr)
        return 3
    except ServingProfileError as e:
        print(f"odyssey plan-serve: {e}\n(or keep --max-running / --max-batch-tokens / "
              f"--prompt-len / --output-len inside the profiled range)", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"odyssey plan-serve: {e}", file=sys.stderr)
        return 2
    m = prof.model
    print(f"model {m['n_blocks']} blocks x d{m['d_model']} ({m['n_heads']} heads), profile "
          f"from {prof.device.get('host', '?')}; {cfg.gpus} GPU(s); SLO p{pct}: TTFT <= "
          f"{cmd.ttft_ms:g} ms, TPOT <= {cmd.tpot_ms:g} ms")
    print(res.table(pct))
    print(f"chosen: {best.layout} at up to {best.max_rate:.2f} req/s; predicted there:")
    for name in ("ttft", "tpot"):
        vals = " / ".join(f"{final[f'{name}_p{p}_s'] * 1e3:.2f}" for p in (50, 90, 99))
        print(f"  {name.upper()} p50/p90/p99 = {vals} ms")
    out = {"chosen": str(best.layout), "max_rate_rps": best.max_rate, "predicted": final,
           "layouts": [{"layout": str(r.layout), "max_rate_rps": r.max_rate}
                       for r in res.results]}
    if loss:
        chosen, cands = loss
        print(f"after losing GPU {cmd.lose_gpu} (horizon {cmd.recovery.horizon_s:g} s):")
        for c in sorted(cands, key=lambda c: -c.score):
            mark = "*" if c is chosen else " "
            print(f" {mark} {c.kind:13s} transition {c.predicted_transition_s:7.2f} s  "
                  f"requests over horizon {c.score:10.0f}  {c.note}")
        out["after_loss"] = {"lost_gpu": cmd.lose_gpu, "chosen": chosen.row(),
                             "candidates": [c.row() for c in cands]}
    if cmd.json:
        with open(cmd.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(plan_serve_main())

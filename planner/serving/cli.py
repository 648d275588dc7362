"""`odyssey plan-serve`: choose replicas x TP x PP for N GPUs to meet TTFT/TPOT targets.

    python -m profiler.serving_profiler --out serving_profile.json      # measure the tables once
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
from dataclasses import replace

from planner.serving.batching import SchedulerConfig, TraceConfig, generate_requests
from planner.serving.estimator import GiB, ServingCostConfig, SLOError, simulate_layout
from planner.serving.search import (
    ServeRecoveryConfig,
    ServeSearchConfig,
    SLOConfig,
    plan_gpu_loss,
    search_serving,
)
from profiler.profile import LinkFit
from profiler.serving import ServingProfile, ServingProfileError


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="odyssey plan-serve", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--profile", required=True,
                    help="serving profile JSON (python -m profiler.serving_profiler)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs available (default 8)")
    ap.add_argument("--ttft-ms", type=float, default=200.0, help="TTFT target, ms")
    ap.add_argument("--tpot-ms", type=float, default=20.0, help="TPOT target, ms")
    ap.add_argument("--percentile", type=int, default=90, help="percentile of both targets")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="memory per GPU, GiB")
    ap.add_argument("--reserve-gb", type=float, default=0.0, help="kept free per GPU, GiB")
    ap.add_argument("--link-alpha-us", type=float, default=10.0,
                    help="inter-GPU latency per message, us (assumed)")
    ap.add_argument("--link-gbps", type=float, default=100.0,
                    help="inter-GPU bandwidth, GB/s (assumed)")
    ap.add_argument("--max-tp", type=int, default=8)
    ap.add_argument("--max-pp", type=int, default=4)
    ap.add_argument("--requests", type=int, default=120,
                    help="requests per replica in each simulated trace")
    ap.add_argument("--prompt-len", type=_pair, default=(16, 192), help="lo,hi tokens")
    ap.add_argument("--output-len", type=_pair, default=(4, 64), help="lo,hi tokens")
    ap.add_argument("--seed", type=int, default=0, help="trace seed")
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--lose-gpu", type=int, default=None,
                    help="also plan the re-configuration after this GPU fails")
    ap.add_argument("--horizon-s", type=float, default=600.0,
                    help="expected time to the next change (scores a re-configuration)")
    ap.add_argument("--weight-load-gbps", type=float, default=2.0,
                    help="per-GPU weight (re)load bandwidth, GB/s")
    ap.add_argument("--json", default=None, help="also write the result here")
    return ap


def plan_serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey plan-serve`; returns the exit status."""
    args = build_parser().parse_args(argv)
    pct = args.percentile
    try:
        prof = ServingProfile.load(args.profile)
        cfg = ServeSearchConfig(
            gpus=args.gpus, slo=SLOConfig(args.ttft_ms / 1e3, args.tpot_ms / 1e3, pct),
            trace=TraceConfig(num_requests=args.requests, prompt_len=args.prompt_len,
                              output_len=args.output_len, seed=args.seed),
            sched=SchedulerConfig(args.max_batch_tokens, args.max_running),
            cost=ServingCostConfig(args.memory_gb * GiB, args.reserve_gb * GiB,
                                   LinkFit(args.link_alpha_us * 1e-6, args.link_gbps * 1e9,
                                           [], "assumed")),
            max_tp=args.max_tp, max_pp=args.max_pp)
        if not 0 < pct < 100:
            raise ValueError(f"--percentile must be in (0, 100), got {pct}")
        res = search_serving(prof, cfg)
        best = res.best
        fleet = replace(cfg.trace, rate=best.max_rate,
                        num_requests=cfg.trace.num_requests * best.layout.replicas)
        final = simulate_layout(generate_requests(fleet), prof, best.layout, cfg.cost,
                                cfg.sched).summary()
        loss = None
        if args.lose_gpu is not None:
            rc = ServeRecoveryConfig(args.horizon_s, args.weight_load_gbps * 1e9)
            loss = plan_gpu_loss(prof, cfg, best.layout, args.lose_gpu, rc)
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
          f"from {prof.device.get('host', '?')}; {args.gpus} GPU(s); SLO p{pct}: TTFT <= "
          f"{args.ttft_ms:g} ms, TPOT <= {args.tpot_ms:g} ms")
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
        print(f"after losing GPU {args.lose_gpu} (horizon {args.horizon_s:g} s):")
        for c in sorted(cands, key=lambda c: -c.score):
            mark = "*" if c is chosen else " "
            print(f" {mark} {c.kind:13s} transition {c.predicted_transition_s:7.2f} s  "
                  f"requests over horizon {c.score:10.0f}  {c.note}")
        out["after_loss"] = {"lost_gpu": args.lose_gpu, "chosen": chosen.row(),
                             "candidates": [c.row() for c in cands]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(plan_serve_main())

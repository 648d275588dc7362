"""Post-recovery throughput of each recovery policy, and how adaptive compares.

Emulated compute (10 ms forward / 20 ms backward per layer per microbatch), real
processes and communication. For each scenario (a DP x PP shape and a victim rank) every
fixed policy and `adaptive` run the same job and the same SIGKILL; we report the
post-recovery median step time (the redone step excluded), the cost model's prediction
for the chosen plan, and the effective throughput from the kill to the end of the run
(transition cost included).

    python benchmarks/recovery_throughput.py                       # 2x4 and 4x4 scenarios
    python benchmarks/recovery_throughput.py --scenarios 2x4:5 --steps 14
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import launch, out_dir  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402

POLICIES = ("reroute", "redundant", "reparallelize", "restart", "adaptive")


def run(args, dp: int, pp: int, victim: int, policy: str) -> dict:
    layers = 2 * pp
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = launch(dp * pp, run_dir, [
            "--mode", "emulated", "--dp", str(dp), "--pp", str(pp), "--steps", str(args.steps),
            "--num-microbatches", str(2 * dp * 2), "--microbatch-size", "2",
            "--log-every", "1000", "--emu-num-layers", str(layers), "--emu-forward-ms", "10",
            "--emu-backward-ms", "20", "--ft-policy", policy, "--checkpoint-every", "4",
            "--horizon-s", str(args.horizon_s),
            "--inject", f"kill:rank={victim},step={args.kill_step},phase=backward"],
            timeout_s=900)
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        ev = next(e for e in report["events"] if e["kind"] == "recovery")
        fault = read_jsonl(run_dir / "faults.jsonl")[0]["time"]
        after = [m["step_time_s"] for m in metrics if m["step"] > ev["resume_step"]]
        end = metrics[-1]["time"]
        done_after = sum(1 for m in metrics if m["step"] >= ev["resume_step"])
        return {"policy": policy, "chosen": ev["chosen"], "mttr_s": ev["mttr_s"],
                "step_s": statistics.median(after), "predicted_step_s": ev["predicted_step_s"],
                "effective_samples_per_s": done_after * report["global_batch"] / (end - fault),
                "lost_steps": ev["lost_steps"], "samples": report["samples"],
                "candidates": ev["candidates"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="2x4:5,2x4:7,4x4:6",
                    help="DPxPP:victim_rank, comma separated (default: %(default)s)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--kill-step", type=int, default=5)
    ap.add_argument("--horizon-s", type=float, default=600.0)
    ap.add_argument("--out", default=str(out_dir() / "recovery_throughput.json"))
    args = ap.parse_args(argv)
    results = []
    for sc in args.scenarios.split(","):
        shape, victim = sc.split(":")
        dp, pp = (int(x) for x in shape.lower().split("x"))
        rows = [run(args, dp, pp, int(victim), p) for p in args.policies.split(",")]
        fixed = [r for r in rows if r["policy"] != "adaptive"]
        best = min(fixed, key=lambda r: r["step_s"]) if fixed else None
        ada = next((r for r in rows if r["policy"] == "adaptive"), None)
        print(f"\nscenario {shape}, kill rank {victim} at step {args.kill_step} "
              f"({dp * pp} ranks, emulated compute)")
        print(f"{'policy':>14} {'chosen':>14} {'step ms':>8} {'pred ms':>8} {'err':>6} "
              f"{'MTTR ms':>8} {'eff samples/s':>14}")
        for r in rows:
            err = r["step_s"] / r["predicted_step_s"] - 1
            print(f"{r['policy']:>14} {r['chosen']:>14} {r['step_s'] * 1e3:8.1f} "
                  f"{r['predicted_step_s'] * 1e3:8.1f} {err:+6.1%} {r['mttr_s'] * 1e3:8.0f} "
                  f"{r['effective_samples_per_s']:14.1f}")
        summary = {"scenario": sc, "ranks": dp * pp, "rows": rows}
        if best and ada:
            summary["adaptive_vs_best_fixed"] = best["step_s"] / ada["step_s"]
            print(f"adaptive post-recovery throughput = "
                  f"{summary['adaptive_vs_best_fixed']:.1%} of the best fixed policy "
                  f"({best['policy']})")
        results.append(summary)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                          "compute": "emulated (sleeps), real processes",
                                          "scenarios": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

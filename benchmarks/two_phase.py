"""Two-phase recovery against reroute and reparallelize, side by side, emulated compute.

8 ranks (DP 2 x PP 4), 8 emulated layers (10 ms forward / 20 ms backward per layer per
microbatch) of `--dim` x `--dim` weights, so each layer's state (weights and Adam's two
moments, fp32) is 12 x dim^2 bytes (48 MB at the default 2048): a reparallelization
moves real bytes, over gloo on loopback. One rank is SIGKILLed during backward at step 6;
the same job runs under each policy in turn (adaptive: whichever the horizon score
picks), `--repeats` rounds interleaved so every
policy sees the same load.

Per run: the recovery's MTTR and phases (fault to every survivor running the new plan);
for two-phase, the switch (steps trained in phase one, the background copy measured
against its prediction, the switch's own stall) and the step time in each phase; for
every policy the median step time after the recovery (after the switch for two-phase)
and `finish_s`, the wall time from the kill to the last step (the same steps remain for
every policy, so it is the work comparison the horizon score predicts).

    python benchmarks/two_phase.py                      # 4 policies x 2 rounds
    python benchmarks/two_phase.py --repeats 3 --background-Bps 2e8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import launch, out_dir  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402

POLICIES = ("reroute", "reparallelize", "two-phase", "adaptive")


def job_args(args, policy: str) -> list[str]:
    out = ["--mode", "emulated", "--dp", "2", "--pp", "4", "--steps", str(args.steps),
           "--num-microbatches", str(args.num_microbatches), "--microbatch-size", "2",
           "--log-every", "1000",
           "--emu-num-layers", "8", "--emu-forward-ms", "10", "--emu-backward-ms", "20",
           "--emu-dim", str(args.dim), "--ft-policy", policy,
           "--inject", f"kill:rank={args.victim},step={args.kill_step},phase=backward"]
    if args.background_Bps:
        out += ["--fault-tolerance.background-Bps", str(args.background_Bps)]
    return out


def once(args, policy: str) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = launch(8, run_dir, job_args(args, policy))
        events = [e for e in report["events"] if e["kind"] == "recovery"]
        metrics = read_jsonl(run_dir / contract.METRICS_FILE)
        fault = read_jsonl(run_dir / contract.FAULTS_FILE)[0]["time"]
    first = events[0]
    times = {m["step"]: m["step_time_s"] for m in metrics}
    row = {"policy": policy, "chosen": first["chosen"], "loadavg_1m": load,
           "mttr_s": first["mttr_s"], "phases": first["phases"],
           "moved_bytes": first["moved_bytes"],
           "predicted_transition_s": first["predicted_transition_s"],
           "finish_s": metrics[-1]["time"] - fault, "samples": report["samples"],
           "replicas_identical": report["replicas_identical"], "mode": report["mode"]}
    switch = next((e for e in events[1:] if e["policy"] == "switch"), None)
    after_from = first["resume_step"] + 1
    if switch is not None:
        bg = switch["background"]
        row.update(switch_step=switch["resume_step"], phase1_steps=bg["steps"],
                   background_measured_s=bg["measured_s"],
                   background_predicted_s=bg["predicted_s"],
                   background_moved_bytes=first["two_phase"]["background_moved_bytes"],
                   switch_mttr_s=switch["mttr_s"], switch_phases=switch["phases"],
                   phase1_step_s=statistics.median(
                       times[k] for k in range(after_from, switch["resume_step"])))
        after_from = switch["resume_step"] + 1
    after = [times[k] for k in range(after_from, args.steps) if k in times]
    row["step_s_after"] = statistics.median(after) if after else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill-step", type=int, default=6)
    ap.add_argument("--victim", type=int, default=5, help="rank to SIGKILL")
    ap.add_argument("--dim", type=int, default=2048, help="emulated layer width")
    ap.add_argument("--num-microbatches", type=int, default=8)
    ap.add_argument("--background-Bps", type=float, default=0.0,
                    help="fault_tolerance.background_Bps (0: the copy is not rate-limited)")
    ap.add_argument("--out", default=str(out_dir() / "two_phase.json"))
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for r in range(args.repeats):
        for p in policies:
            row = once(args, p)
            runs[p].append(row)
            print(f"round {r} {p:>13}: MTTR {row['mttr_s'] * 1e3:6.0f} ms, finish "
                  f"{row['finish_s']:.2f} s, after {row['step_s_after'] * 1e3:.0f} ms/step"
                  + (f", switch after {row['phase1_steps']} steps (copy "
                     f"{row['background_measured_s'] * 1e3:.0f} ms, predicted "
                     f"{row['background_predicted_s'] * 1e3:.0f}), switch "
                     f"{row['switch_mttr_s'] * 1e3:.0f} ms" if "switch_step" in row else "")
                  + f"  (load {row['loadavg_1m']:.1f})", flush=True)
    summary = [_summary(p, rows) for p, rows in runs.items()]
    print(f"\n{'policy':>13} | MTTR ms | finish s | step after ms | switch ms | copy ms "
          f"(predicted)")
    for s in summary:
        print(f"{s['policy']:>13} | {s['mttr_ms']:7.0f} | {s['finish_s']:8.2f} | "
              f"{s['step_after_ms']:13.0f} | "
              + (f"{s['switch_ms']:9.0f} | {s['copy_ms']:.0f} ({s['copy_predicted_ms']:.0f})"
                 if "switch_ms" in s else f"{'-':>9} | -"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "compute": "emulated (sleeps), real processes",
         "ranks": 8, "dim": args.dim, "layer_state_bytes": 12 * args.dim * (args.dim + 1),
         "background_Bps": args.background_Bps, "summary": summary, "runs": runs},
        indent=1))
    print(f"wrote {args.out}")
    return 0


def _summary(policy: str, rows: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)
    out = {"policy": policy, "runs": len(rows), "chosen": sorted({r["chosen"] for r in rows}),
           "mttr_ms": med("mttr_s") * 1e3, "finish_s": med("finish_s"),
           "step_after_ms": med("step_s_after") * 1e3,
           "loadavg_1m": [r["loadavg_1m"] for r in rows],
           "lost": sum(r["samples"]["lost"] for r in rows),
           "duplicated": sum(r["samples"]["duplicated"] for r in rows),
           "replicas_identical": all(r["replicas_identical"] for r in rows)}
    switched = [r for r in rows if "switch_step" in r]
    if switched:
        out.update(switch_ms=statistics.median(r["switch_mttr_s"] for r in switched) * 1e3,
                   copy_ms=statistics.median(r["background_measured_s"] for r in switched)
                   * 1e3,
                   copy_predicted_ms=statistics.median(r["background_predicted_s"]
                                                       for r in switched) * 1e3,
                   phase1_steps=[r["phase1_steps"] for r in switched],
                   phase1_step_ms=statistics.median(r["phase1_step_s"] for r in switched)
                   * 1e3)
    return out


if __name__ == "__main__":
    sys.exit(main())

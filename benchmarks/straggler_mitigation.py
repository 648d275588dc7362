"""Straggler mitigation, side by side: one rank made 3x slower for good, with and without
mitigation, and against every mitigation chosen by hand: each microbatch split, and the
re-partitioned slow pipeline (rank 1 keeps one layer) with each split.

Emulated compute (each layer sleeps its configured time), `odyssey run` with 8 worker
processes, DP 2 x PP 4, 8 microbatches. Rank 1 (stage 1 of pipeline 0) computes
`--factor` x slower from step 5 for good. Each run's steady-state throughput is the
median step time of its last `--tail` steps (metrics.jsonl); the runs follow each other
in one invocation and are repeated `--repeat` times interleaved, so load shifts hit all
alike. Hand-picked runs start from a plan file with that split (and layout) and
mitigation off; the re-partitioned layout is the speed-weighted partition the planner
would compute for rank 1 at `--factor` (`planner.mitigation.repartitioned`).

    python benchmarks/straggler_mitigation.py [--steps 40] [--out results/straggler.json]

`--until U` measures the way back instead: rank 1 slow for steps 5..U-1 only, with
mitigation, beside a failure-free run of the same length (interleaved): the step the
leader re-plans back, whether it is the initial plan, and the tail step time of both
runs (the last `--tail` steps, after the re-plan back).

    python benchmarks/straggler_mitigation.py --until 20 --steps 70 --tail 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from statistics import median
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import launch, step_times  # noqa: E402
from planner.cost import CostModel  # noqa: E402
from planner.mitigation import layouts_of, repartitioned, with_counts  # noqa: E402
from planner.plan import Plan  # noqa: E402
from profiler.synthetic import emulated_profile  # noqa: E402

SLOW_RANK = 1


def hand_plan(args, counts: list[int], split: bool) -> Plan:
    """The uniform 2 x 4 plan with `counts` microbatches per pipeline; with `split`, the
    slow pipeline re-partitioned for rank 1's factor."""
    plan = Plan.uniform(8, 2, 4, 8, 1)
    if split:
        emu = SimpleNamespace(num_layers=8, forward_ms=args.forward_ms,
                              backward_ms=2 * args.forward_ms, dim=16)
        plan = repartitioned(plan, CostModel(emulated_profile(emu),
                                             slowdown={SLOW_RANK: args.factor}))
    return with_counts(plan, counts)


def run(label: str, args, mitigate: bool, plan: Plan | None, inject: bool = True) -> dict:
    load = os.getloadavg()[0]
    until = f",until={args.until}" if args.until else ""
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        flags = ["--mode", "emulated", "--dp", "2", "--pp", "4", "--steps", str(args.steps),
                 "--num-microbatches", "8", "--microbatch-size", "1", "--log-every", "1000",
                 "--emu-num-layers", "8", "--emu-forward-ms", str(args.forward_ms),
                 "--emu-backward-ms", str(2 * args.forward_ms),
                 "--straggler.mitigate" if mitigate else "--straggler.no-mitigate"]
        if inject:
            flags += ["--inject", f"slow:rank={SLOW_RANK},step=5,factor={args.factor:g}{until}"]
        if plan is not None:  # chosen by hand: this plan from the start
            plan_file = Path(d) / "plan.json"
            plan_file.write_text(plan.to_json())
            flags += ["--plan-file", str(plan_file)]
        report = launch(8, run_dir, flags)
        tail = step_times(run_dir, args.steps - args.tail)
        events = report["events"]
    found = [e for e in events if e["kind"] == "straggler"]
    cleared = [e for e in events if e["kind"] == "straggler_cleared"]
    replans = [e for e in events if e["kind"] == "recovery" and e["cause"] == "replan"]
    chosen = [e for e in events if e["kind"] == "mitigation" and e["chosen"] != "keep"]
    results = [e for e in events if e["kind"] == "mitigation_result"]
    step_s = median(tail)
    return {"label": label, "mitigate": mitigate,
            "counts": [len(p.microbatches) for p in plan.pipelines] if plan else None,
            "stages": layouts_of(plan) if plan else None, "loadavg_1m": load,
            "steady_step_s": step_s, "samples_per_s": 8 / step_s,
            "detected_at_step": found[0]["step"] if found else None,
            "mitigation": chosen[0]["note"] if chosen else None,
            "mitigation_kind": chosen[0]["chosen"] if chosen else None,
            "predicted_step_s": results[0]["predicted_step_s"] if results else None,
            "measured_step_s": results[0]["measured_step_s"] if results else None,
            "cleared_at_step": cleared[0]["step"] if cleared else None,
            "replans": [(e["resume_step"], e["chosen"]) for e in replans],
            "back_to_initial": bool(replans) and replans[-1]["plan"] == report["initial_plan"],
            "lost": report["samples"]["lost"], "duplicated": report["samples"]["duplicated"],
            "replicas_identical": report["replicas_identical"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per run")
    ap.add_argument("--tail", type=int, default=12, help="steps the steady state is taken over")
    ap.add_argument("--factor", type=float, default=3.0, help="slowdown of rank 1")
    ap.add_argument("--forward-ms", type=float, default=4.0,
                    help="emulated forward time per layer and microbatch (backward: 2x)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs, interleaved")
    ap.add_argument("--until", type=int, default=0,
                    help="slow only before this step; measure the way back (see above)")
    ap.add_argument("--out", default="", help="write the rows and summary as JSON here")
    args = ap.parse_args()
    if args.until:
        return way_back(args)
    plans = [("off", False, None), ("on", True, None)] + [
        (f"hand {k}/{8 - k}", False, hand_plan(args, [k, 8 - k], False))
        for k in range(1, 5)] + [
        (f"hand split {k}/{8 - k}", False, hand_plan(args, [k, 8 - k], True))
        for k in range(2, 5)]
    rows = []
    for _ in range(args.repeat):
        for label, mitigate, plan in plans:
            rows.append(run(label, args, mitigate, plan))
            r = rows[-1]
            print(f"{label:15} {r['samples_per_s']:7.1f} samples/s  step "
                  f"{r['steady_step_s'] * 1e3:6.1f} ms  load {r['loadavg_1m']:.1f}  "
                  f"{r['mitigation'] or ''}", flush=True)
    by = {label: median(r["samples_per_s"] for r in rows if r["label"] == label)
          for label, _, _ in plans}
    hand = max((label for label in by if label.startswith("hand")), key=by.get)
    on = [r for r in rows if r["label"] == "on"]
    summary = {"samples_per_s": by, "on_over_off": by["on"] / by["off"],
               "on_over_best_hand": by["on"] / by[hand], "best_hand": hand,
               "detected_at_step": [r["detected_at_step"] for r in on],
               "chosen": [r["mitigation_kind"] for r in on],
               "mitigation": [r["mitigation"] for r in on],
               "split_stages": layouts_of(hand_plan(args, [4, 4], True)),
               "prediction_error": [r["measured_step_s"] / r["predicted_step_s"] - 1
                                    for r in on if r["predicted_step_s"]],
               "lost_or_duplicated": sum(r["lost"] + r["duplicated"] for r in rows),
               "compute": "emulated (sleeping layers), 8 processes on this machine"}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


def way_back(args) -> None:
    """Slow for steps 5..until-1 with mitigation, beside failure-free: see the docstring."""
    rows = []
    for _ in range(args.repeat):
        for label, inject in (("failure-free", False), (f"slow until {args.until}", True)):
            rows.append(run(label, args, True, None, inject))
            r = rows[-1]
            print(f"{label:15} tail step {r['steady_step_s'] * 1e3:6.1f} ms  load "
                  f"{r['loadavg_1m']:.1f}  found {r['detected_at_step']} cleared "
                  f"{r['cleared_at_step']} replans {r['replans']} back "
                  f"{r['back_to_initial']}", flush=True)
    slow = [r for r in rows if r["label"] != "failure-free"]
    ratio = [s["steady_step_s"] / f["steady_step_s"]
             for s, f in zip(slow, (r for r in rows if r["label"] == "failure-free"))]
    summary = {"tail_over_failure_free": ratio, "median_ratio": median(ratio),
               "detected_at_step": [r["detected_at_step"] for r in slow],
               "cleared_at_step": [r["cleared_at_step"] for r in slow],
               "replans": [r["replans"] for r in slow],
               "back_to_initial": [r["back_to_initial"] for r in slow],
               "tail_steps": args.tail, "until": args.until,
               "lost_or_duplicated": sum(r["lost"] + r["duplicated"] for r in rows),
               "replicas_identical": all(r["replicas_identical"] for r in rows),
               "compute": "emulated (sleeping layers), 8 processes on this machine"}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()

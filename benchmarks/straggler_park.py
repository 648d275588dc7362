"""Parking a straggler, side by side: one rank made many times slower for a while, with
parking (the default), with in-place mitigation only (`--straggler.no-park`), and with
no mitigation; plus a failure-free run.

Emulated compute (each layer sleeps its configured time), `odyssey run` with 4 worker
processes, DP 2 x PP 2, 4 microbatches. Rank 3 (stage 1 of pipeline 1) computes
`--factor` x slower for steps 5..`--until`-1. For each run: the median step time over
the slow steps after the mitigation settled (steps 15..until-1), over the last `--tail`
steps (after the way back), the mitigation chosen, when a parked rank rejoined, and the
sample ledger. The runs follow each other in one invocation, `--repeat` rounds
interleaved, so load shifts hit all alike.

    python benchmarks/straggler_park.py [--factor 20] [--until 40] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import launch, step_times  # noqa: E402

RUNS = {"park": [], "in-place": ["--straggler.no-park"],
        "no mitigation": ["--straggler.no-mitigate"], "failure-free": None}


def run(label: str, args) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        flags = ["--mode", "emulated", "--dp", "2", "--pp", "2", "--steps", str(args.steps),
                 "--num-microbatches", "4", "--microbatch-size", "1", "--log-every", "1000",
                 "--emu-num-layers", "4", "--emu-forward-ms", str(args.forward_ms),
                 "--emu-backward-ms", str(2 * args.forward_ms), "--progress", "off"]
        if RUNS[label] is not None:
            flags += [*RUNS[label], "--inject",
                      f"slow:rank=3,step=5,factor={args.factor:g},until={args.until}"]
        report = launch(4, run_dir, flags)
        times = step_times(run_dir, 0)
    events = report["events"]
    chosen = [e["chosen"] for e in events if e["kind"] == "mitigation" and e["chosen"] != "keep"]
    joins = [e for e in events if e["kind"] == "recovery" and e["cause"] == "join"]
    return {"label": label, "loadavg_1m": load,
            "slowed_step_s": median(times[15:args.until]),
            "tail_step_s": median(times[-args.tail:]),
            "after_rejoin_step_s": median(times[joins[0]["resume_step"] + 1:])
            if joins and joins[0]["resume_step"] + 1 < len(times) else None,
            "mitigations": chosen, "rejoined_at_step": joins[0]["resume_step"] if joins else None,
            "final_members": joins[-1]["members"] if joins else None,
            "lost": report["samples"]["lost"], "duplicated": report["samples"]["duplicated"],
            "replicas_identical": report["replicas_identical"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100,
                    help="steps per run (the parked rank rejoins some 30 steps after --until)")
    ap.add_argument("--until", type=int, default=40, help="first step no longer slowed")
    ap.add_argument("--tail", type=int, default=12, help="steps the end's step time is taken over")
    ap.add_argument("--factor", type=float, default=20.0, help="slowdown of rank 3")
    ap.add_argument("--forward-ms", type=float, default=4.0,
                    help="emulated forward per layer and microbatch (backward: twice that)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs, interleaved")
    ap.add_argument("--out", default="", help="write the rows and summary as JSON here")
    args = ap.parse_args()
    if not 15 < args.until < args.steps - args.tail:
        ap.error("need 15 < --until < --steps - --tail (slow steps to measure, then a tail)")
    rows = [run(label, args) for _ in range(args.repeat) for label in RUNS]
    for r in rows:
        print(json.dumps(r))
    by = {label: [r for r in rows if r["label"] == label] for label in RUNS}
    slowed = {k: median(r["slowed_step_s"] for r in v) for k, v in by.items()}
    tail = {k: median(r["tail_step_s"] for r in v) for k, v in by.items()}
    summary = {
        "mode": "emulated compute", "factor": args.factor, "until": args.until,
        "slowed_step_s": slowed, "tail_step_s": tail,
        "park_vs_no_mitigation_while_slow": slowed["no mitigation"] / slowed["park"],
        "park_vs_in_place_while_slow": slowed["in-place"] / slowed["park"],
        "park_tail_vs_failure_free": tail["park"] / tail["failure-free"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()

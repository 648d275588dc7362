"""Swap to fit, live: what memory-aware recovery chooses under a device-memory limit,
and its predicted vs measured post-recovery step time, side by side.

Emulated compute (layers sleep their configured time; the saved tensors are real, so
Chameleon's copies are real memory traffic on copy threads), `odyssey run` with 4 worker
processes, DP 2 x PP 2, GPipe (every microbatch's activations in flight), rank 1
SIGKILLed at step 8. A probe run with room to spare gives the redundant plan's predicted
peak and swap floor; the capacity is set between them, so redundant compute (and here
reroute) fit only by swapping. Variants, run in turn and repeated interleaved:

- `no limit`: the probe (adaptive, nothing over budget);
- `aware+swap`: adaptive, swapping priced (the default);
- `aware`: adaptive, `--fault-tolerance.no-swap-to-fit` (unfit plans dropped);
- `unaware`: `--fault-tolerance.no-memory-aware` (today's choice before memory counted);
- `redundant+swap`: the fixed redundant policy, which must swap at this capacity.

Per run: the chosen plan, whether it fits, the ranks that swap, the predicted step time
and the median measured step time after the recovery (its first two steps left out),
and on swapping ranks the most saved bytes Chameleon kept resident against the budget.

    python benchmarks/swap_recovery.py [--repeat 2] [--out benchmarks/results/swap_recovery.json]
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
from odyssey import contract  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402

KILL_STEP = 8


def flags(args, capacity: str) -> list[str]:
    return ["--mode", "emulated", "--emu-num-layers", "8", "--emu-dim", str(args.dim),
            "--emu-forward-ms", str(args.forward_ms),
            "--emu-backward-ms", str(2 * args.forward_ms), "--dp", "2", "--pp", "2",
            "--steps", str(args.steps), "--num-microbatches", "8",
            "--microbatch-size", str(args.microbatch_size), "--training.schedule", "gpipe",
            "--swap-min-bytes", "4096", "--log-every", "1000", "--device-memory", capacity,
            "--inject", f"kill:rank=1,step={KILL_STEP},phase=backward"]


def run(label: str, args, capacity: str, extra: list[str]) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = launch(4, run_dir, [*flags(args, capacity), *extra])
        events = list(read_jsonl(run_dir / contract.EVENTS_FILE))
        tail = step_times(run_dir, KILL_STEP + 2)
    [rec] = [e for e in events if e["kind"] == "recovery"]
    outcome = next(e for e in events if e["kind"] == "recovery_result")
    chosen = max((c for c in rec["candidates"] if c["kind"] == rec["chosen"]),
                 key=lambda c: c["score"])
    measured = median(tail)
    return {"label": label, "loadavg_1m": load, "capacity": capacity,
            "chosen": rec["chosen"], "pipelines": chosen["pipelines"],
            "fits": chosen["fits"], "peak_bytes": chosen["peak_bytes"],
            "floor_bytes": chosen["floor_bytes"], "swap_ranks": chosen["swap_ranks"],
            "swap_s": chosen["swap_s"], "predicted_step_s": rec["predicted_step_s"],
            "measured_step_s": measured,
            "error": rec["predicted_step_s"] / measured - 1,
            "swapping": outcome["swapping"], "candidates": rec["candidates"],
            "dropped": rec["dropped"], "lost": report["samples"]["lost"],
            "duplicated": report["samples"]["duplicated"],
            "replicas_identical": report["replicas_identical"]}


def show(r: dict) -> None:
    swaps = ", ".join(f"rank {k} {v['peak_resident'] / 2**20:.2f}/{v['budget'] / 2**20:.2f} MiB"
                      for k, v in r["swapping"].items())
    print(f"{r['label']:15} {r['chosen']:13} {str(r['pipelines']):10} "
          f"fits={str(r['fits']):5} predicted {r['predicted_step_s'] * 1e3:6.1f} ms  "
          f"measured {r['measured_step_s'] * 1e3:6.1f} ms  ({r['error']:+.1%})  "
          f"load {r['loadavg_1m']:.1f}  {swaps}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per run")
    ap.add_argument("--dim", type=int, default=256, help="emulated layer width")
    ap.add_argument("--microbatch-size", type=int, default=256,
                    help="samples per microbatch (saved bytes per layer: mb x dim x 4)")
    ap.add_argument("--forward-ms", type=float, default=5.0,
                    help="emulated forward time per layer and microbatch (backward: 2x)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of all runs, interleaved")
    ap.add_argument("--out", default="", help="write the rows and summary as JSON here")
    args = ap.parse_args()
    probe = run("no limit", args, "64GiB", [])
    show(probe)
    red = next(c for c in probe["candidates"] if c["kind"] == "redundant")
    cap = str(int((red["floor_bytes"] + red["peak_bytes"]) / 2))
    print(f"capacity {int(cap) / 2**20:.2f} MiB per rank: redundant peaks at "
          f"{red['peak_bytes'] / 2**20:.2f}, fits with swapping from "
          f"{red['floor_bytes'] / 2**20:.2f}", flush=True)
    variants = [("no limit", "64GiB", []), ("aware+swap", cap, []),
                ("aware", cap, ["--fault-tolerance.no-swap-to-fit"]),
                ("unaware", cap, ["--fault-tolerance.no-memory-aware"]),
                ("redundant+swap", cap, ["--ft-policy", "redundant"])]
    rows = [probe]
    for i in range(args.repeat):
        for label, c, extra in variants:
            if i == 0 and label == "no limit":
                continue  # the probe was this run
            rows.append(run(label, args, c, extra))
            show(rows[-1])
    summary: dict = {"capacity_bytes": int(cap),
                     "compute": "emulated (sleeping layers, real saved tensors and copies), "
                                "4 processes on this machine"}
    for label, _, _ in variants:
        rs = [r for r in rows if r["label"] == label]
        summary[label] = {
            "chosen": sorted({f"{r['chosen']} {r['pipelines']}" for r in rs}),
            "fits": [r["fits"] for r in rs], "swap_ranks": [r["swap_ranks"] for r in rs],
            "predicted_step_s": median(r["predicted_step_s"] for r in rs),
            "measured_step_s": median(r["measured_step_s"] for r in rs),
            "errors": [round(r["error"], 4) for r in rs],
            "peak_resident_within_budget": all(v["peak_resident"] <= v["budget"]
                                               for r in rs for v in r["swapping"].values()),
            "over_capacity": [r["peak_bytes"] > int(cap) and not r["swap_ranks"] for r in rs]}
    summary["lost_or_duplicated"] = sum(r["lost"] + r["duplicated"] for r in rows)
    summary["replicas_identical"] = all(r["replicas_identical"] for r in rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r.pop("candidates")
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()

"""MTTR of each recovery kind vs torchrun's restart, side by side, emulated compute.

8 ranks (DP 2 x PP 4), 8 emulated layers (10 ms forward / 20 ms backward per layer per
microbatch), 8 microbatches of 2 samples. One rank is SIGKILLed during backward at
step 6. MTTR runs from the kill (the injector's timestamp) to the moment every survivor
starts executing the new plan's Program; the redone step is reported beside it.

torchrun baseline: the same script under `torchrun --max-restarts 1` with checkpoints
every 5 steps; its MTTR runs from the kill to the restarted group's first step (after
the checkpoint reload), and the steps since that checkpoint are redone on top.

    python benchmarks/mttr.py                 # all kinds + torchrun, 8 ranks
    python benchmarks/mttr.py --kinds reroute --repeats 1
    python benchmarks/mttr.py --kinds reroute,redundant,reparallelize --repeats 3 \
        --control-planes poll,notify          # the old and the new control plane, interleaved
    python benchmarks/mttr.py --kinds reparallelize --repeats 3 \
        --variant "shared device=" --variant "device per group=--comm.share-device false"

Each figure is printed with `os.getloadavg()` (1-minute) taken just before the run: timing
runs need a quiet machine. `--control-planes` runs each in-place kind under each control
plane (monitor.control_plane), alternating run by run so both see the same load.
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
from odyssey.report import read_jsonl  # noqa: E402

KINDS = ("reroute", "redundant", "reparallelize", "restart")


def job_args(args, policy: str, flags: list[str] | None = None) -> list[str]:
    return [*(flags or []), "--mode", "emulated", "--dp", str(args.dp), "--pp", str(args.pp),
            "--steps", str(args.steps), "--num-microbatches", "8", "--microbatch-size", "2",
            "--log-every", "1000", "--emu-num-layers", "8", "--emu-forward-ms", "10",
            "--emu-backward-ms", "20", "--ft-policy", policy, "--checkpoint-every", "5",
            "--inject", f"kill:rank={args.victim},step={args.kill_step},phase=backward"]


def odyssey_once(args, kind: str, variant: tuple[str, tuple[str, ...]] | None = None) -> dict:
    load = os.getloadavg()[0]
    label, flags = variant or ("default", [])
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = launch(args.dp * args.pp, run_dir, job_args(args, kind, list(flags)))
        ev = next(e for e in report["events"] if e["kind"] == "recovery")
        times = [m["step_time_s"] for m in read_jsonl(run_dir / "metrics.jsonl")]
        before = statistics.median(times[1:args.kill_step])
        after = statistics.median(times[ev["resume_step"] + 1:])
        return {"kind": ev["chosen"], "mttr_s": ev["mttr_s"], "phases": ev["phases"],
                "subphases": ev.get("subphases", {}), "loadavg_1m": load,
                "control_plane": label,
                "redone_step_s": ev["redone_step_s"], "lost_steps": ev["lost_steps"],
                "step_s_before": before, "step_s_after": after,
                "predicted_step_s": ev["predicted_step_s"],
                "samples": report["samples"], "mode": report["mode"]}


def torchrun_once(args) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = launch(args.dp * args.pp, run_dir, job_args(args, "adaptive"), "torchrun",
                        extra_launcher_args=["--max-restarts", "1"])
        fault = read_jsonl(run_dir / "faults.jsonl")[0]["time"]
        resume = next(e for e in report["events"] if e["kind"] == "resume")
        return {"kind": "torchrun-restart", "mttr_s": resume["time"] - fault,
                "lost_steps": args.kill_step - resume["checkpoint_step"] - 1, "loadavg_1m": load,
                "samples": report["samples"], "mode": report["mode"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS) + ",torchrun")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--kill-step", type=int, default=6)
    ap.add_argument("--victim", type=int, default=5, help="rank to SIGKILL")
    ap.add_argument("--control-planes", default="",
                    help="comma list of monitor.control_plane values to compare (poll = the "
                         "old design, notify = the new); default: the job's default")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                    help="a job variant to compare (repeatable), e.g. 'per-group=--comm."
                         "share-device false'; runs interleave with the other variants")
    ap.add_argument("--out", default=str(out_dir() / "mttr.json"))
    args = ap.parse_args(argv)
    planes = [(p, ("--monitor.control-plane", p)) for p in args.control_planes.split(",") if p]
    for v in args.variant:
        label, _, flags = v.partition("=")
        planes.append((label, tuple(flags.split())))
    planes = planes or [None]
    rows = []
    for kind in args.kinds.split(","):
        if kind == "torchrun":
            by_plane = {None: [torchrun_once(args) for _ in range(args.repeats)]}
        else:
            by_plane = {p: [] for p in planes}
            for _ in range(args.repeats):  # interleaved, so both planes see the same load
                for p in planes:
                    by_plane[p].append(odyssey_once(args, kind, p))
        for plane, runs in by_plane.items():
            rows.append(_row(kind, plane, runs))
    tr = next((r for r in rows if r["kind"] == "torchrun"), None)
    if tr:
        for r in rows:
            if r is not tr:
                r["speedup_vs_torchrun"] = tr["mttr_s_median"] / r["mttr_s_median"]
                print(f"{r['kind']:>14}: {r['speedup_vs_torchrun']:.1f}x faster than torchrun "
                      "restart (MTTR only; torchrun also redoes the steps since its checkpoint)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                          "compute": "emulated (sleeps), real processes",
                                          "ranks": args.dp * args.pp, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _row(kind: str, variant: tuple[str, tuple[str, ...]] | None, runs: list[dict]) -> dict:
    plane = variant[0] if variant else None
    mttrs = [r["mttr_s"] for r in runs]
    row = {"kind": kind, "control_plane": plane or "default",
           "mttr_s_median": statistics.median(mttrs), "mttr_s": mttrs, "runs": runs}
    label = kind if plane is None else f"{kind}/{plane}"
    loads = [round(r["loadavg_1m"], 2) for r in runs]
    r0 = runs[0]
    print(f"{label:>22}: MTTR median {row['mttr_s_median'] * 1e3:6.0f} ms "
          f"(runs {[round(m * 1e3) for m in mttrs]}, load {loads}), lost steps "
          f"{r0['lost_steps']}, samples lost {r0['samples']['lost']} dup "
          f"{r0['samples']['duplicated']}", flush=True)
    if "phases" in r0:
        for name in ("phases", "subphases"):
            keys = list(dict.fromkeys(k for r in runs for k in r[name]))
            med = {k: statistics.median([r[name][k] for r in runs if k in r[name]])
                   for k in keys}
            print(f"{'':>24}{name} median ms: "
                  + " ".join(f"{k}={v * 1e3:.1f}" for k, v in med.items()), flush=True)
        print(f"{'':>24}redone step {r0['redone_step_s'] * 1e3:.0f} ms; step "
              f"{r0['step_s_before'] * 1e3:.0f} -> {r0['step_s_after'] * 1e3:.0f} ms "
              f"(predicted {r0['predicted_step_s'] * 1e3:.0f})", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())

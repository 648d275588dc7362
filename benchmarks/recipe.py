"""The pretraining example's step time under recipe variants, side by side in one run.

    python benchmarks/recipe.py [--steps 40] [--out benchmarks/results/recipe.json]

Each variant runs examples/pretrain_llama.py (real math, 4 CPU ranks, 2 pipelines x 2
stages, the stdlib token file `make setup` builds) under `odyssey run` and reports the
median step time and the share of step time the leader (rank 0, a first stage that loads
inputs) spent waiting for its batches (`data_wait_s` in metrics.jsonl). Variants: bf16
(the example's default) against fp32 compute, and the background loader
(`--data.prefetch 2`) against synchronous loading (`--data.prefetch 0`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, out_dir  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402

SCRIPT = ROOT / "examples" / "pretrain_llama.py"
VARIANTS: dict[str, list[str]] = {
    "bf16, background loader (prefetch 2)": ["--precision", "bf16", "--prefetch", "2"],
    "bf16, synchronous loading (prefetch 0)": ["--precision", "bf16", "--prefetch", "0"],
    "fp32, background loader (prefetch 2)": ["--precision", "fp32", "--prefetch", "2"],
}
"""Variant name -> the example's extra flags."""


def run_variant(name: str, flags: list[str], steps: int, data: str, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node", "4",
           "--run-dir", str(run_dir), str(SCRIPT), "--data", data, "--dp", "2", "--pp", "2",
           "--steps", str(steps), "--eval-every", "0", "--log-every", "1000",
           "--progress", "off", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    metrics = read_jsonl(run_dir / contract.METRICS_FILE)[3:]  # warm-up steps left out
    step_s = [m["step_time_s"] for m in metrics]
    wait_s = [m["data_wait_s"] for m in metrics]
    return {"variant": name, "flags": flags, "steps_timed": len(metrics),
            "median_step_s": statistics.median(step_s),
            "data_wait_share": sum(wait_s) / sum(step_s),
            "max_data_wait_s": max(wait_s), "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib.bin"),
                   help="token file (make setup builds data/stdlib.bin)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run")
    p.add_argument("--out", type=Path, default=out_dir() / "recipe.json")
    args = p.parse_args(argv)
    rows = []
    for name, flags in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        rows.append(run_variant(name, flags, args.steps, args.data,
                                out_dir("recipe", str(len(rows)))))
    load = os.getloadavg()
    print(f"{'variant':40s} {'median step':>12s} {'data wait':>10s} {'max wait':>9s}"
          f"   (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    for r in rows:
        print(f"{r['variant']:40s} {r['median_step_s'] * 1e3:9.1f} ms "
              f"{r['data_wait_share'] * 100:9.2f}% {r['max_data_wait_s'] * 1e3:6.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mode": "real", "ranks": 4, "plan": "dp2 x pp2",
                                    "steps": args.steps, "load_average": load,
                                    "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

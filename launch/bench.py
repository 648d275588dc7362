"""Run a reproducible benchmark by name: `odyssey bench NAME [ARGS...]`.

    odyssey bench list
    odyssey bench mttr --repeats 3
    odyssey bench recovery-throughput --scenarios 2x4:5

Benchmarks live in the repository's benchmarks/ folder and write their tables to
stdout and JSON under runs/bench/ (`--out` to change; the copies docs/ cite are in
benchmarks/results/); docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCHMARKS = {
    "mttr": "mttr.py",
    "recovery-throughput": "recovery_throughput.py",
    "straggler-mitigation": "straggler_mitigation.py",
    "swap-recovery": "swap_recovery.py",
    "store-wait-stall": "store_wait_stall.py",
    "emulated-step-time": "emulated_step_time.py",
    "plan-search-speed": "plan_search_speed.py",
    "engine-vs-deepspeed": "engine_vs_deepspeed.py",
    "torchft-baseline": "torchft_baseline.py",
    "swap": "swap_bench.py",
    "model-accuracy": "model_accuracy.py",
    "serving-accuracy": "serving_accuracy.py",
    "ray-actor-death": "ray_actor_death.py",
    "cluster-scale": "cluster_scale.py",
    "sim-vs-runtime": "sim_vs_runtime.py",
    "node-loss": "node_loss.py",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__)
        for name, script in BENCHMARKS.items():
            state = "" if (root / script).exists() else "  (missing)"
            print(f"  {name:<22} benchmarks/{script}{state}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"odyssey bench: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    script = root / BENCHMARKS[name]
    if not script.exists():
        print(f"odyssey bench: {script} not found (benchmarks ship with the source tree)",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(root.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    return 0

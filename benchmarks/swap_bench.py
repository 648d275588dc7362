"""Chameleon benchmark: memory, step time and tokens/s of activation-memory strategies.

GPU (default when CUDA is present; exits 0 with a message otherwise):

    python benchmarks/swap_bench.py                      # --device cuda
    python benchmarks/swap_bench.py --fixed-budget 16GiB --out swap_gpu.json

  For a GPT at several sizes: peak torch.cuda.max_memory_allocated, median step time and
  tokens/s for no swap, Chameleon, full activation checkpointing (torch.utils.checkpoint),
  torch.autograd.graph.save_on_cpu and DeepSpeed activation checkpointing with CPU
  offload (if deepspeed imports); the longest sequence each method trains within a
  fixed device budget; light-monitor and idle-Chameleon overhead.

CPU (runs on a laptop, real numbers now):

    python benchmarks/swap_bench.py --device cpu --tier disk

  Peak RSS (VmHWM, fresh process per configuration) and step time for no swap,
  Chameleon on the disk tier, checkpointing; light-monitor and idle-Chameleon overhead.

Every configuration runs `benchmarks/swap_measure.py` in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = ROOT / "benchmarks" / "swap_measure.py"
GPU_SIZES = [  # (d_model, layers, heads, batch, seq)
    (1024, 12, 16, 8, 1024),
    (2048, 16, 16, 4, 2048),
    (4096, 16, 32, 2, 2048),
]
CPU_SIZES = [(64, 8, 4, 8, 128), (128, 4, 4, 8, 256)]
GiB = 1 << 30


def measure(args: list[str], timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, str(MEASURE), *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def size_args(s: tuple[int, ...]) -> list[str]:
    d, L, h, b, t = s
    return ["--d-model", str(d), "--layers", str(L), "--heads", str(h), "--batch", str(b),
            "--seq", str(t)]


def fmt_row(name: str, r: dict, mem_key: str, base: dict | None) -> str:
    if "error" in r:
        return f"  {name:<14} FAILED: {r['error']}"
    mem = r[mem_key] or 0
    s = (f"  {name:<14} peak {mem / 2**20:9.1f} MiB  step {r['step_s_median'] * 1e3:9.1f} ms"
         f"  {r['tokens_per_s']:10.0f} tok/s")
    if base and "error" not in base:
        s += f"  ({r['step_s_median'] / base['step_s_median']:.2f}x time)"
    if "out_bytes" in r:
        s += (f"  moved {r['out_bytes'] / 2**20:.1f} MiB, recomputed "
              f"{r['recompute_bytes'] / 2**20:.1f} MiB, stall {r['stall_s'] * 1e3:.1f} ms")
    return s


def print_overhead(o: dict) -> None:
    if "error" in o:
        print(f"  overhead: FAILED {o['error']}")
        return
    us = o["us_per_tensor"]
    print(f"  overhead per step ({o['saved_tensors_per_step']} saved tensors, bare step "
          f"{o['bare_step_s'] * 1e3:.1f} ms): light monitor {o['monitor_overhead'] * 100:.3f}% "
          f"({us['monitor_light']:.1f} us/tensor), detailed "
          f"{o['monitor_detailed_overhead'] * 100:.3f}% ({us['monitor_detailed']:.1f} us), "
          f"idle Chameleon "
          f"{o['chameleon_idle_overhead'] * 100:.3f}% ({us['chameleon_idle']:.1f} us); "
          f"identity hooks {us['identity_hooks']:.1f} us")


def run_cpu(a: argparse.Namespace) -> dict:
    results: dict = {"device": "cpu", "tier": a.tier, "sizes": []}
    timing = ["--steps", str(a.steps), "--warmup", "2", "--threads", str(a.threads)]
    for s in CPU_SIZES:
        common = size_args(s) + timing
        rows = {
            "none": measure(["--mode", "none", *common]),
            "chameleon": measure(["--mode", "chameleon", "--tier", a.tier, "--budget-frac",
                                  str(a.budget_frac), *common]),
            "checkpoint": measure(["--mode", "checkpoint", *common]),
            "overhead": measure(["--mode", "overhead", "--tier", a.tier, *size_args(s),
                                 "--steps", str(max(a.steps, 5)), "--warmup", "1",
                                 "--threads", str(a.threads)]),
        }
        base = rows["none"]
        print(f"GPT d={s[0]} layers={s[1]} batch={s[3]} seq={s[4]}: activations "
              f"{base.get('activation_bytes', 0) / 2**20:.1f} MiB (CPU; peak = VmHWM - VmRSS "
              f"before the step)")
        for k in ("none", "chameleon", "checkpoint"):
            print(fmt_row(k, rows[k], "step_peak", base))
        ch = rows["chameleon"]
        if "error" not in ch and "error" not in base:
            drop = base["step_peak"] - ch["step_peak"]
            print(f"  peak RSS drop {drop / 2**20:.1f} MiB for {ch['out_bytes'] / 2**20:.1f} MiB "
                  f"moved ({drop / max(ch['out_bytes'], 1):.2f} of moved bytes)")
        print_overhead(rows["overhead"])
        results["sizes"].append({"size": s, **rows})
    return results


def run_gpu(a: argparse.Namespace) -> dict:  # pragma: no cover - needs a GPU
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    results: dict = {"device": torch.cuda.get_device_name(0), "sizes": [], "ladder": {}}
    timing = ["--device", "cuda", "--steps", str(a.steps), "--warmup", "3",
              "--threads", str(a.threads)]
    try:
        import deepspeed  # noqa: F401
        have_ds = True
    except Exception:
        have_ds = False
    modes = ["none", "chameleon", "checkpoint", "save_on_cpu"]
    if have_ds:
        modes.append("deepspeed")
    for s in GPU_SIZES:
        common = size_args(s) + timing
        rows = {}
        for mode in modes:
            extra = ["--tier", "pinned", "--budget-frac", str(a.budget_frac)] \
                if mode == "chameleon" else []
            rows[mode] = measure(["--mode", mode, *extra, *common])
        base = rows["none"]
        print(f"GPT d={s[0]} layers={s[1]} batch={s[3]} seq={s[4]} (CUDA max_memory_allocated)")
        for k in modes:
            print(fmt_row(k, rows[k], "cuda_max_alloc", base))
        rows["overhead"] = measure(["--mode", "overhead", "--tier", "pinned", *common])
        print_overhead(rows["overhead"])
        if not have_ds:
            print("  deepspeed: not importable, skipped")
        results["sizes"].append({"size": s, **rows})
    # longest sequence per method within a fixed device budget
    budget = a.fixed_budget
    frac = min(1.0, budget / total)
    d, L, h, b, _ = GPU_SIZES[0]
    print(f"Longest sequence at a fixed budget of {budget / GiB:.1f} GiB "
          f"(d={d}, layers={L}, batch={b}):")
    for mode in modes:
        best = None
        for t in (512, 1024, 2048, 4096, 8192, 16384):
            extra = ["--tier", "pinned", "--budget", str(int(budget * 0.5))] \
                if mode == "chameleon" else []
            r = measure(["--mode", mode, *extra, *size_args((d, L, h, b, t)), "--device", "cuda",
                         "--steps", "2", "--warmup", "2", "--mem-fraction", str(frac)])
            if "error" in r:
                break
            best = t
        results["ladder"][mode] = best
        print(f"  {mode:<14} {best}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Chameleon swap benchmark")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tier", default="disk", help="CPU mode host tier")
    ap.add_argument("--budget-frac", type=float, default=0.25,
                    help="Chameleon budget as a fraction of activation bytes")
    ap.add_argument("--fixed-budget", type=float, default=16 * GiB,
                    help="GPU: device bytes for the longest-sequence ladder")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("swap_bench: CUDA not available; GPU benchmark skipped "
                  "(use --device cpu --tier disk for the CPU benchmark)")
            return 0
        res = run_gpu(a)
    else:
        res = run_cpu(a)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

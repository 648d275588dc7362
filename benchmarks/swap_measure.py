"""Measure ONE configuration of a CPU (or GPU) training step in THIS process; print JSON.

Run it in a fresh process per configuration so peaks never mix, e.g.:

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/swap_measure.py --mode chameleon \
        --tier disk --budget-frac 0.25

Peak memory on CPU is the process's own accounting: VmHWM from /proc/self/status, reset
with /proc/self/clear_refs before the measured steps (VmRSS sampled as a fallback).
`step_peak` = max over measured steps of (VmHWM - VmRSS just before the step): what the
step itself adds, after warm-up (lazy imports, allocator caches) is done. On CUDA the
device figure is torch.cuda.max_memory_allocated. Modes: none, chameleon, checkpoint
(torch.utils.checkpoint per block), save_on_cpu (torch.autograd.graph.save_on_cpu),
monitor (light-mode op monitor only, to measure its overhead).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from chameleon import SwapConfig, SwapManager  # noqa: E402
from chameleon.reference_models import TinyConfig, TinyGPT, batch  # noqa: E402
from profiler.op_monitor import OpMonitor  # noqa: E402


def status(field: str) -> int:
    """A /proc/self/status field in bytes (0 where unavailable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def activation_bytes(model: TinyGPT, x: torch.Tensor, y: torch.Tensor) -> int:
    """Distinct non-parameter storages saved for backward, counted with identity hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x, y)
    del loss
    return sum(seen.values())


class CkptGPT(torch.nn.Module):
    """Full activation checkpointing of every block (torch.utils.checkpoint)."""

    def __init__(self, m: TinyGPT) -> None:
        super().__init__()
        self.m = m

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.m.embed(x)
        for blk in self.m.blocks:
            h = checkpoint(blk, h, use_reentrant=False)
        logits = self.m.head(self.m.ln(h))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))


class DeepSpeedCkptGPT(CkptGPT):
    """DeepSpeed activation checkpointing with checkpoints offloaded to CPU."""

    def __init__(self, m: TinyGPT) -> None:
        super().__init__(m)
        import os

        import deepspeed
        from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
            os.environ.setdefault(k, v)
        deepspeed.init_distributed()  # its checkpointing asserts a process group exists

        ds_ckpt.configure(None, partition_activations=False, checkpoint_in_cpu=True,
                          contiguous_checkpointing=False, synchronize=False, profile=False)
        self.ckpt = ds_ckpt.checkpoint

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.m.embed(x)
        for blk in self.m.blocks:
            h = self.ckpt(blk, h)
        logits = self.m.head(self.m.ln(h))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))


def _hook_cost(ctx: object, tensors: list[torch.Tensor], reps: int = 15) -> float:
    """Seconds per saved tensor for the pack + unpack hooks installed by `ctx`, timed on
    the tensors one real step saves (best of `reps`; robust on a busy machine)."""
    best = float("inf")
    with ctx:  # type: ignore[attr-defined]
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
        for _ in range(reps):
            t0 = time.perf_counter()
            handles = [pack(t) for t in tensors]
            for h in handles:
                unpack(h)
            del handles
            best = min(best, time.perf_counter() - t0)
    return best / max(len(tensors), 1)


def overhead(model: TinyGPT, x: torch.Tensor, y: torch.Tensor, dev: torch.device,
             a: argparse.Namespace) -> dict:
    """Light-monitor and idle-Chameleon overhead: hook cost per saved tensor (timed on the
    tensors of a real step) x saved tensors per step, against the bare step time (min of
    several). End-to-end step times are too noisy on a shared machine to resolve <1%."""
    bare = []
    for _ in range(a.warmup + a.steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model.loss(x, y).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bare.append(time.perf_counter() - t0)
    step = min(bare[a.warmup:])
    mon = OpMonitor()
    mon.attach(model)
    mgr = SwapManager(model, SwapConfig(budget="1TiB", tier=a.tier, lanes=a.lanes), device=dev)
    with mgr.step_context():  # first (detailed) step: a policy exists afterwards
        model.loss(x, y).backward()
    saved: list[torch.Tensor] = []  # the tensors of one step, graph kept alive while timing
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model.loss(x, y)
    identity = _hook_cost(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
                          saved)
    mon_cost = _hook_cost(mon.step(detailed=False), saved)
    mon_detail = _hook_cost(mon.step(detailed=True), saved)
    cham = _hook_cost(mgr.step_context(), saved)
    n = len(saved)
    del loss
    out = {"mode": "overhead", "device": a.device, "d_model": a.d_model, "layers": a.layers,
           "batch": a.batch, "seq": a.seq, "saved_tensors_per_step": n, "bare_step_s": step,
           "us_per_tensor": {"identity_hooks": identity * 1e6, "monitor_light": mon_cost * 1e6,
                             "monitor_detailed": mon_detail * 1e6,
                             "chameleon_idle": cham * 1e6},
           "monitor_overhead": n * mon_cost / step,
           "monitor_detailed_overhead": n * mon_detail / step,
           "chameleon_idle_overhead": n * cham / step}
    mgr.close()
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="chameleon",
                    choices=["none", "chameleon", "checkpoint", "save_on_cpu", "monitor",
                             "deepspeed", "overhead"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tier", default="disk")
    ap.add_argument("--lanes", default="auto")
    ap.add_argument("--budget", default=None, help="bytes or e.g. 256MiB")
    ap.add_argument("--budget-frac", type=float, default=0.25,
                    help="budget as a fraction of activation bytes (if --budget unset)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="CUDA: cap this process at this fraction of device memory")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and a.mem_fraction:
        torch.cuda.set_per_process_memory_fraction(a.mem_fraction)
    cfg = TinyConfig(d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                     max_len=max(256, a.seq), vocab=256)
    model = TinyGPT(cfg).to(dev)
    x, y = (t.to(dev) for t in batch(cfg, a.batch, a.seq, seed=0))
    act = activation_bytes(model, x, y)
    budget = int(a.budget) if a.budget and a.budget.isdigit() else a.budget
    if budget is None:
        budget = int(act * a.budget_frac)
    step_model: torch.nn.Module = model
    if a.mode == "checkpoint":
        step_model = CkptGPT(model)
    elif a.mode == "deepspeed":
        step_model = DeepSpeedCkptGPT(model)
    mgr, mon = None, None
    if a.mode == "chameleon":
        mgr = SwapManager(model, SwapConfig(budget=budget, tier=a.tier, lanes=a.lanes,
                                            host_arena_bytes=int(act * 1.2)), device=dev)
    if a.mode == "monitor":
        mon = OpMonitor()
        mon.attach(model)

    def ctx() -> object:
        if mgr is not None:
            return mgr.step_context()
        if mon is not None:
            return mon.step(detailed=False)
        if a.mode == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")
        return nullcontext()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with ctx():
            step_model.loss(x, y).backward()

    if a.mode == "overhead":
        return overhead(model, x, y, dev, a)
    gc.collect()
    rss_base = status("VmRSS")
    for _ in range(a.warmup):
        step()
    times, peaks = [], []
    for _ in range(a.steps):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ok = reset_peak()
        rss0 = status("VmRSS")
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append({"hwm": status("VmHWM") if ok else 0, "rss_before": rss0,
                      "cuda_max_alloc": torch.cuda.max_memory_allocated()
                      if dev.type == "cuda" else None})
    out = {
        "mode": a.mode, "device": a.device, "tier": a.tier if mgr else None,
        "d_model": a.d_model, "layers": a.layers, "batch": a.batch, "seq": a.seq,
        "activation_bytes": act, "budget": budget if mgr else None, "rss_base": rss_base,
        "peak_hwm": max(p["hwm"] for p in peaks), "rss_before_step": peaks[-1]["rss_before"],
        "step_peak": max(p["hwm"] - p["rss_before"] for p in peaks),
        "cuda_max_alloc": peaks[-1]["cuda_max_alloc"],
        "step_s_median": statistics.median(times), "step_s": times,
        "tokens_per_s": a.batch * a.seq / statistics.median(times),
    }
    if mgr is not None:
        last = mgr.last.stats  # type: ignore[union-attr]
        out.update({"out_bytes": last.out_bytes, "in_bytes": last.in_bytes,
                    "recompute_bytes": last.recompute_bytes,
                    "peak_resident": last.peak_resident, "stall_s": last.stall_s,
                    "sync_fetches": last.sync_fetches, "report": mgr.report()})
        mgr.close()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

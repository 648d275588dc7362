"""Serving profiler: measure `profiler.serving.ServingProfile` tables on this machine.

The caller passes the model, duck-typed like `examples.gpt_kv.KVCacheGPT` (`cfg`,
`blocks`, `embed`, `dense_pre`, `dense_post`, `attend_prefill`, `step`, `head`,
`allocate`/`free`, `free_slots`, `pool`, `param_bytes`); the profiler imports nothing
of the examples. The example GPT's command line is `examples/profile_serving.py`:

    python examples/profile_serving.py --out serving_profile.json
"""

from __future__ import annotations

import platform
import random
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from profiler.serving import (
    ServingProfile,
    ServingProfileError,
    iteration_parts,
)
from profiler.timing import TimingConfig, robust_stat


@dataclass(frozen=True)
class ServingProfilerConfig:
    """Grids and timing of the serving profiler."""

    dense_tokens: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192,
                                     256, 384, 512)
    """Token counts for the dense table (dense below 8: one row takes a matrix-vector
    kernel, a few rows a matrix-matrix one; the time is far from linear there)."""
    prefill_lens: tuple[int, ...] = (1, 16, 32, 64, 128, 192, 256, 384, 512)
    """Prompt lengths for the prefill-attention table (<= model context)."""
    decode_batch: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    """Batch sizes for the decode-attention table."""
    decode_kv: tuple[int, ...] = (16, 64, 128, 256, 512)
    """KV lengths per request for the decode-attention table (<= model context)."""
    head_rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Row counts for the head table."""
    calibration_batches: int = 8
    """Whole iterations of random mixed shapes timed to fit the overhead terms, on top of
    a designed set (decode-only batches of every table size, single prompts, one mixed)
    that keeps the two-term fit well conditioned."""
    wake_idle_s: float = 0.05
    """Idle wait before each cold sample of the wake calibration (about the gap between
    arrivals of a lightly loaded server); 0 skips it (wake_s = 0)."""
    wake_samples: int = 6
    """Idle-then-iterate samples per wake calibration shape (each paired with a warm one)."""
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(warmup=2, repeats=7))
    """Warm-up and repeats per point (median kept)."""
    rounds: int = 3
    """Shuffled sweeps over all points (and calibration shapes); medians are kept."""
    clock: str = "thread"
    """'thread': CPU time of the calling thread (torch on 1 thread computes there), blind
    to other processes preempting it on a shared machine; 'wall': elapsed time."""
    seed: int = 1234
    """Seed of the random tokens and calibration shapes."""


def profile_serving(model, config: ServingProfilerConfig | None = None) -> ServingProfile:
    """Measure `model` (a `KVCacheGPT`-like object) and return its `ServingProfile`.

    Every point is timed once per round, the rounds sweep all points in a shuffled order,
    and a point's value is its median over rounds: a burst of load from other processes
    then spoils one sample of many points instead of every sample of a few.
    """
    cfg = config or ServingProfilerConfig()
    mc = model.cfg
    d, nb = mc.d_model, len(model.blocks)
    gen = torch.Generator().manual_seed(cfg.seed)
    if max(cfg.decode_batch) > len(model.free_slots):
        raise ServingProfileError(f"decode_batch up to {max(cfg.decode_batch)} needs as many "
                                  f"free KV slots; the model has {len(model.free_slots)}")

    def tokens(n: int):
        return torch.randint(0, mc.vocab_size, (n,), generator=gen)

    def t(fn) -> float:
        return time_median(fn, cfg.timing, cfg.clock)

    points: dict[tuple, object] = {}
    for n in cfg.dense_tokens:
        tok, pos = tokens(n), torch.arange(n) % mc.context
        att = torch.randn(n, d, generator=gen)

        def run_dense(tok=tok, pos=pos, att=att):
            x = model.embed(tok, pos)
            for b in range(nb):
                model.dense_pre(b, x)
                x = model.dense_post(b, x, att)
        points["dense", n] = run_dense
    for p in cfg.prefill_lens:
        qkv = torch.randn(p, 3 * d, generator=gen)
        points["prefill", p] = lambda qkv=qkv: [model.attend_prefill(b, 0, qkv)
                                                 for b in range(nb)]
    for bsz in cfg.decode_batch:
        for kv in cfg.decode_kv:
            decodes = [(r, 7, kv) for r in range(bsz)]
            points["decode", bsz, kv] = lambda decodes=decodes: model.step([], decodes)
    for n in cfg.head_rows:
        x = torch.randn(n, d, generator=gen)
        points["head", n] = lambda x=x: model.head(x)

    for r in range(max(cfg.decode_batch)):
        model.allocate(r, max(max(cfg.prefill_lens), max(cfg.decode_kv)))
    try:
        got = _rounds(points, t, cfg.rounds, random.Random(cfg.seed))
    finally:
        for r in range(max(cfg.decode_batch)):
            model.free(r)

    pool = model.pool  # [slots, blocks, 2, heads, context, head_dim]
    kv_bpt = pool[0, :, :, :, 0].numel() * pool.element_size()
    prof = ServingProfile(
        model={"vocab_size": mc.vocab_size, "context": mc.context, "d_model": d,
               "n_heads": mc.n_heads, "n_blocks": nb},
        device={**_device(), "clock": cfg.clock, "rounds": cfg.rounds},
        kv_bytes_per_token=kv_bpt, param_bytes=float(model.param_bytes),
        dense_tokens=list(cfg.dense_tokens),
        dense_s=[got["dense", n] for n in cfg.dense_tokens],
        prefill_lens=list(cfg.prefill_lens),
        prefill_attn_s=[got["prefill", p] for p in cfg.prefill_lens],
        decode_batch=list(cfg.decode_batch), decode_kv=list(cfg.decode_kv),
        decode_step_s=[[got["decode", b, k] for k in cfg.decode_kv] for b in cfg.decode_batch],
        head_rows=list(cfg.head_rows),
        head_s=[got["head", n] for n in cfg.head_rows]).check()
    _calibrate(prof, model, cfg, tokens, t)
    _calibrate_wake(prof, model, cfg, tokens)
    return prof


def _rounds(points: dict, t, rounds: int, rng: random.Random) -> dict:
    """Median over `rounds` shuffled sweeps of t(fn) for every point."""
    samples: dict = {k: [] for k in points}
    keys = list(points)
    for _ in range(max(1, rounds)):
        rng.shuffle(keys)
        for k in keys:
            samples[k].append(t(points[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def time_median(fn, timing: TimingConfig, clock: str = "thread") -> float:
    """Median (outliers trimmed) of `fn()` timed by `clock` ('thread' or 'wall')."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {sorted(CLOCKS)}")
    now = CLOCKS[clock]
    with torch.no_grad():
        for _ in range(timing.warmup):
            fn()
        samples = []
        for _ in range(max(1, timing.repeats)):
            t0 = now()
            fn()
            samples.append(now() - t0)
    return robust_stat(samples, timing.outlier_mads).median


def random_batch(rng: random.Random, max_prompt: int, max_kv: int, max_batch: int,
                 max_tokens: int = 512) -> tuple[list[int], list[int]]:
    """A random mixed batch shape: (prompt lengths, decode KV lengths)."""
    n_pre = rng.choice([0, 0, 1, 1, 2, 3])
    n_dec = (rng.choice([0, 1, 2, 4, 8, 16, 24]) if n_pre else rng.randint(1, 32))
    n_dec = min(n_dec, max_batch)
    pre = [rng.randint(8, max_prompt) for _ in range(n_pre)]
    while sum(pre) + n_dec > max_tokens:
        pre.pop()
    dec = [rng.randint(8, max_kv) for _ in range(n_dec)]
    return pre, dec


def time_batch(model, pre: list[int], dec: list[int], tokens, t) -> float:
    """Median time of one whole iteration of the given shape."""
    with batch_of(model, pre, dec, tokens) as (prefills, decodes):
        return t(lambda: model.step(prefills, decodes))


@contextmanager
def batch_of(model, pre: list[int], dec: list[int], tokens
             ) -> Iterator[tuple[list, list]]:
    """(prefills, decodes) arguments of `model.step` for prompts of `pre` tokens and decodes
    at KV lengths `dec`, with their KV cache allocated for the duration."""
    for i, p in enumerate(pre):
        model.allocate(i, p)
    for j, k in enumerate(dec):
        model.allocate(1000 + j, k)
    try:
        yield ([(i, tokens(p)) for i, p in enumerate(pre)],
               [(1000 + j, 7, k) for j, k in enumerate(dec)])
    finally:
        for rid in [*range(len(pre)), *range(1000, 1000 + len(dec))]:
            model.free(rid)


def _calibrate(prof: ServingProfile, model, cfg: ServingProfilerConfig, tokens, t) -> None:
    """Fit a (iterations without decodes) + b * prompts to (whole iteration - parts)."""
    rng = random.Random(cfg.seed)
    rows = []
    kv = min(model.cfg.context - 1, sorted(cfg.decode_kv)[len(cfg.decode_kv) // 2])
    plen = sorted(cfg.prefill_lens)[len(cfg.prefill_lens) // 2]
    small = max(1, plen // 4)
    shapes = [([plen], []), ([small] * 2, []), ([small] * 3, []), ([plen], [kv] * 4),
              ([small] * 2, [kv] * 8), ([small], [kv])]
    while len(shapes) < 6 + cfg.calibration_batches:
        pre, dec = random_batch(rng, min(192, max(cfg.prefill_lens)),
                                min(model.cfg.context - 1, max(cfg.decode_kv)),
                                max(cfg.decode_batch))
        if pre:  # decode-only iterations are table entries already
            shapes.append((pre, dec))
    times: list[list[float]] = [[] for _ in shapes]
    order = list(range(len(shapes)))
    for _ in range(max(1, cfg.rounds)):
        rng.shuffle(order)
        for i in order:
            times[i].append(time_batch(model, *shapes[i], tokens, t))
    for (pre, dec), ts in zip(shapes, times):
        rows.append({"prefill_lens": pre, "decode_kv": dec, "measured_s": statistics.median(ts),
                     "parts_s": iteration_parts(prof, pre, dec)})
    # a decode-only iteration's fixed cost is inside decode_step: only prompts add to it
    a = np.array([[0.0 if r["decode_kv"] else 1.0, len(r["prefill_lens"])] for r in rows])
    y = np.array([r["measured_s"] - r["parts_s"] for r in rows])
    # weight by 1/measured: the accuracy target is relative error
    w = 1.0 / np.array([r["measured_s"] for r in rows])
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    if coef.min() < 0:  # noise can make a term negative: refit with it held at 0
        keep = int(np.argmax(coef))
        sol = np.linalg.lstsq((a * w[:, None])[:, [keep]], y * w, rcond=None)[0]
        coef = np.zeros(2)
        coef[keep] = max(0.0, float(sol[0]))
    prof.overhead_s, prof.overhead_per_request_s = float(coef[0]), float(coef[1])
    prof.calibration = rows


def _calibrate_wake(prof: ServingProfile, model, cfg: ServingProfilerConfig, tokens) -> None:
    """wake_s: median over pairs of (iteration after `wake_idle_s` idle - the same iteration
    back to back). After an idle wait nothing is running, so the shapes are prefill-only."""
    if cfg.wake_idle_s <= 0:
        return
    plen = sorted(cfg.prefill_lens)[len(cfg.prefill_lens) // 2]
    diffs = []
    for pre in ([plen], [max(1, plen // 4)] * 2):
        diffs += wake_pairs(model, pre, [], tokens, cfg.wake_idle_s, cfg.wake_samples,
                            cfg.clock)
    prof.wake_s = max(0.0, statistics.median(diffs))


def wake_pairs(model, pre: list[int], dec: list[int], tokens, idle_s: float, samples: int,
               clock: str = "thread") -> list[float]:
    """(cold - warm) seconds, `samples` times: a warm iteration right after two others,
    then the same one after sleeping `idle_s`. On the wall clock the cold one is timed from
    the intended wake-up, so the sleep's overshoot counts, as it does in a real server."""
    now = CLOCKS[clock]
    out = []
    with batch_of(model, pre, dec, tokens) as (prefills, decodes):
        with torch.no_grad():
            for _ in range(max(1, samples)):
                model.step(prefills, decodes)
                model.step(prefills, decodes)
                t0 = now()
                model.step(prefills, decodes)
                warm = now() - t0
                target = time.perf_counter() + idle_s
                time.sleep(idle_s)
                t0 = target if clock == "wall" else now()
                model.step(prefills, decodes)
                out.append(now() - t0 - warm)
    return out


def _device() -> dict:
    return {"device": "cpu", "host": socket.gethostname(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "name": platform.processor() or platform.machine()}

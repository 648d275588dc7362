"""Communication micro-benchmarks on real gloo process groups (ranks as threads).

p2p: ping-pong between two ranks (one-way time = round trip / 2) per message size.
all-reduce: every rank times the collective after a barrier; a repeat's time is the
slowest rank's. Both are fitted to alpha + bytes/beta (all-reduce to the ring model
2(n-1)*alpha + 2(n-1)/n * bytes/beta), weighting relative error, and the raw points are
kept in the profile. Threads share one process, so the link measured is loopback: it is
recorded as the 'intra' class unless told otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from profiler.profile import CommProfile, LinkFit
from profiler.timing import TimingConfig, robust_stat


@dataclass(frozen=True)
class CommBenchConfig:
    """What the communication benchmark measures."""

    group_sizes: tuple[int, ...] = (2, 4)
    """All-reduce group sizes (p2p always uses two ranks)."""
    message_bytes: tuple[int, ...] = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
    """Message sizes in bytes (float32 tensors of bytes/4 elements)."""
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(warmup=3, repeats=7))
    """Warm-up, repeats and outlier trimming per point."""
    host: str = "127.0.0.1"
    """Address the store and gloo devices bind to."""
    timeout_s: float = 30.0
    """Gloo and store timeout; a hung benchmark fails instead of waiting forever."""
    link: str = "intra"
    """Link class the measurements are recorded as."""
    store_roundtrips: int = 20
    """compare_set round trips timed to estimate the commit cost."""
    switch_interval_s: float = 1e-4
    """Python thread switch interval while benchmarking (ranks are threads sharing the
    GIL; the default 5 ms would add up to 5 ms to a message)."""


def bench_comm(config: CommBenchConfig | None = None) -> CommProfile:
    """Run the p2p, all-reduce and store benchmarks; return fits with raw points."""
    cfg = config or CommBenchConfig()
    old = sys.getswitchinterval()
    sys.setswitchinterval(cfg.switch_interval_s)  # threads hand over the GIL promptly
    try:
        p2p_points = _run_group(2, cfg, _p2p_worker)
        ar_points: list[list[float]] = []
        for n in cfg.group_sizes:
            ar_points += _run_group(n, cfg, _allreduce_worker)
    finally:
        sys.setswitchinterval(old)
    return CommProfile(
        p2p={cfg.link: fit_link(p2p_points, "p2p")},
        allreduce={cfg.link: fit_link(ar_points, "ring")},
        commit_s=_store_roundtrip(cfg),
    )


def fit_link(points: Sequence[Sequence[float]], model: str = "p2p") -> LinkFit:
    """Fit [bytes, group_size, seconds] points to alpha + bytes/beta ('p2p') or to the
    ring all-reduce model ('ring'), minimising relative error; alpha >= 0, beta > 0."""
    pts = np.asarray(points, dtype=float).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError("no points to fit")
    x, n, t = pts[:, 0], pts[:, 1], pts[:, 2]
    if model == "ring":
        f_alpha, f_bytes = 2 * (n - 1), 2 * (n - 1) / n * x
    elif model == "p2p":
        f_alpha, f_bytes = np.ones_like(x), x
    else:
        raise ValueError(f"unknown model {model!r}")
    w = 1.0 / np.maximum(t, 1e-12)
    a_mat = np.stack([f_alpha * w, f_bytes * w], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(a_mat, t * w, rcond=None)
    if alpha < 0:  # refit through the origin
        alpha = 0.0
        inv_beta = float(np.sum(f_bytes * w * t * w) / max(np.sum((f_bytes * w) ** 2), 1e-300))
    if inv_beta <= 0:  # no bandwidth term visible: latency only
        inv_beta = 1e-15
        alpha = float(np.median(t / f_alpha))
    return LinkFit(float(alpha), float(1.0 / inv_beta), [list(map(float, p)) for p in pts])


Worker = Callable[[ProcessGroupGloo, int, int, CommBenchConfig], list[list[float]]]


def _run_group(n: int, cfg: CommBenchConfig, worker: Worker) -> list[list[float]]:
    """Run `worker` on n threads, each with its own store client and gloo group."""
    master = TCPStore(cfg.host, 0, None, True, timedelta(seconds=cfg.timeout_s),
                      wait_for_workers=False)
    results: dict[int, list[list[float]]] = {}
    errors: list[BaseException] = []
    prefix = f"odyssey-bench-{worker.__name__}-{n}-{time.monotonic_ns()}"

    def run(rank: int) -> None:
        try:
            client = TCPStore(cfg.host, master.port, None, False,
                              timedelta(seconds=cfg.timeout_s))
            opts = ProcessGroupGloo._Options()
            opts._devices = [ProcessGroupGloo.create_device(hostname=cfg.host)]
            opts._timeout = timedelta(seconds=cfg.timeout_s)
            pg = ProcessGroupGloo(PrefixStore(prefix, client), rank, n, opts)
            results[rank] = worker(pg, rank, n, cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=cfg.timeout_s * 4)
    if errors:
        raise RuntimeError(f"comm benchmark with {n} ranks failed: {errors[0]!r}") from errors[0]
    if any(th.is_alive() for th in threads):
        raise RuntimeError(f"comm benchmark with {n} ranks hung (timeout {cfg.timeout_s}s)")
    return results[0]


def _p2p_worker(pg, rank: int, n: int, cfg: CommBenchConfig) -> list[list[float]]:
    points = []
    if rank > 1:
        return points
    peer = 1 - rank
    for nbytes in cfg.message_bytes:
        buf = torch.zeros(max(1, nbytes // 4))
        samples = []
        for rep in range(cfg.timing.warmup + cfg.timing.repeats):
            t0 = time.perf_counter()
            if rank == 0:
                pg.send([buf], peer, 0).wait()
                pg.recv([buf], peer, 1).wait()
            else:
                pg.recv([buf], peer, 0).wait()
                pg.send([buf], peer, 1).wait()
            if rep >= cfg.timing.warmup:
                samples.append((time.perf_counter() - t0) / 2)
        points.append([float(buf.numel() * 4), 2.0,
                       robust_stat(samples, cfg.timing.outlier_mads).median])
    return points


def _allreduce_worker(pg, rank: int, n: int, cfg: CommBenchConfig) -> list[list[float]]:
    points = []
    token = torch.zeros(1)
    for nbytes in cfg.message_bytes:
        buf = torch.ones(max(1, nbytes // 4))
        slowest = torch.zeros(1)
        samples = []
        for rep in range(cfg.timing.warmup + cfg.timing.repeats):
            pg.allreduce([token]).wait()  # barrier
            t0 = time.perf_counter()
            pg.allreduce([buf]).wait()
            slowest.fill_(time.perf_counter() - t0)
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MAX
            pg.allreduce([slowest], opts).wait()
            if rep >= cfg.timing.warmup:
                samples.append(float(slowest.item()))
        points.append([float(buf.numel() * 4), float(n),
                       robust_stat(samples, cfg.timing.outlier_mads).median])
    return points


def _store_roundtrip(cfg: CommBenchConfig) -> float:
    master = TCPStore(cfg.host, 0, None, True, timedelta(seconds=cfg.timeout_s),
                      wait_for_workers=False)
    client = TCPStore(cfg.host, master.port, None, False, timedelta(seconds=cfg.timeout_s))
    samples = []
    for i in range(max(1, cfg.store_roundtrips)):
        t0 = time.perf_counter()
        client.compare_set(f"commit/{i}", "", "1")
        samples.append(time.perf_counter() - t0)
    return robust_stat(samples).median

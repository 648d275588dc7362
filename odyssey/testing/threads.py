"""Run a job's ranks as threads of one process (torchft's trick for fast tests).

Each thread gets its own store client and builds real gloo groups over loopback, so
everything but the process boundary is real. Use it for plan/engine checks where
starting N interpreters would dominate the run time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from odyssey.env import WorkerInfo, store_client

T = TypeVar("T")


def run_threads(world_size: int, fn: Callable[[WorkerInfo], T], timeout_s: float = 120.0,
                run_dir: str | None = None) -> list[T]:
    """Run `fn(worker)` for ranks 0..world_size-1 concurrently; return results by rank.

    Re-raises the first rank's exception as soon as it happens (the other ranks, maybe
    waiting on it, are left behind as daemon threads: their waits time out on their
    own); raises TimeoutError if a rank does not finish within `timeout_s`.
    """
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=timeout_s), use_libuv=True)
    results: list = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def target(rank: int) -> None:
        try:
            store = store_client("127.0.0.1", master.port, timeout_s)
            results[rank] = fn(WorkerInfo(
                rank, world_size, store, rank, 0, "threads", run_dir,
                store_factory=lambda: store_client("127.0.0.1", master.port, timeout_s)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors[rank] = e

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline \
            and not any(errors):
        threads[next(r for r, t in enumerate(threads) if t.is_alive())].join(0.2)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    for r, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"rank {r} failed: {type(e).__name__}: {e}") from e
    if stuck:
        raise TimeoutError(f"ranks {stuck} did not finish within {timeout_s:.0f}s")
    return results

"""Bytes through the job's store, in chunks: a checkpoint file sent to the peer that keeps
its copy, or to a restarting rank that has none on its own disk.

A blob under `key` is `key/0` ... `key/{n-1}` then `key/n` = n, set last, so a reader
that sees the count sees every chunk. The store is the one channel every rank of a job
already has, also at a restart when no process group exists yet; it carries each file
once, so the bytes per checkpoint through it are the model's state once (docs/checkpoints.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

CHUNK = 4 << 20
"""Bytes per store value: the TCPStore holds each in memory; small enough to stay cheap."""


def put_blob(store: dist.Store, key: str, data: bytes) -> None:
    n = max(1, -(-len(data) // CHUNK))
    for i in range(n):
        store.set(f"{key}/{i}", data[i * CHUNK:(i + 1) * CHUNK])
    store.set(f"{key}/n", str(n))


def get_blob(store: dist.Store, key: str, timeout_s: float,
             cancelled: Callable[[], bool] = lambda: False, delete: bool = True
             ) -> bytes | None:
    """The blob under `key` once its writer finished it; None after `timeout_s` or once
    `cancelled()` says to stop waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.wait([f"{key}/n"], timedelta(seconds=min(0.2, max(
                0.01, deadline - time.monotonic()))))
            break
        except dist.DistStoreError:
            if time.monotonic() >= deadline or cancelled():
                return None
    n = int(store.get(f"{key}/n"))
    data = b"".join(store.multi_get([f"{key}/{i}" for i in range(n)]))
    if delete:
        for k in [f"{key}/n", *(f"{key}/{i}" for i in range(n))]:
            store.delete_key(k)
    return data

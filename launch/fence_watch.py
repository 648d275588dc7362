"""Wakes a launcher when a fence is requested anywhere in the job, without polling.

A fencer bumps FENCES_COUNT and then writes that request's note key
(`contract.fence_note_key`); one thread per launcher, with its own store client, blocks
on the next note key. So a launcher makes one blocking wait per fence (and per
`slice_s` when there is none) instead of reading the counter every loop period: at
1024 ranks that read was the largest term of the launchers' store load
(docs/BENCHMARKS.md, control-plane load).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from odyssey import contract

SLICE_S = 2.0
"""The blocking wait's slice: after each, the counter is read once, so a fencer that
died between its bump and its note does not hide the fences after it."""


class FenceWatch:
    """Sets `requested` (and calls `on_fence`) each time a fence request is written."""

    def __init__(self, client: Any, on_fence: Callable[[], None],
                 slice_s: float = SLICE_S) -> None:
        self._client = client
        self._on_fence = on_fence
        self._slice = timedelta(seconds=slice_s)
        self._requested = threading.Event()
        self._stop = threading.Event()
        self._alive = True
        self._thread = threading.Thread(target=self._loop, name="fence-watch", daemon=True)

    def start(self) -> FenceWatch:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """False once its client lost the store: the launcher then reads the counter."""
        return self._alive

    def take(self) -> bool:
        """True (once) when a fence was requested since the last call."""
        if self._requested.is_set():
            self._requested.clear()
            return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def _hint(self) -> None:
        self._requested.set()
        self._on_fence()

    def _loop(self) -> None:
        # torch is imported lazily in the launcher (launch/store.py); it is loaded by now
        from torch.distributed import DistStoreError

        c = self._client
        try:
            seen = c.add(contract.FENCES_COUNT, 0)
            while not self._stop.is_set():
                try:
                    c.wait([contract.fence_note_key(seen + 1)], self._slice)
                    seen += 1
                    self._hint()
                except DistStoreError:  # the slice passed without that note
                    count = c.add(contract.FENCES_COUNT, 0)
                    if count > seen:  # its writer died before the note: look anyway
                        seen = count
                        self._hint()
        except Exception:  # noqa: BLE001 - the store host is gone
            self._alive = False
            self._hint()

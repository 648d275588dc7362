"""Batches prepared ahead in a background thread, so loading is off the critical path.

`BatchLoader` stands where the engine expects its data (`batch(sample_ids) -> (inputs,
targets)`). The engine asks for a batch only on ranks whose stage holds the first layer
(inputs) or the last (targets); each request for step k's microbatch m queues the same
microbatch of steps k+1..k+depth for a background thread, so the microbatches this rank
asks for, under whatever plan it runs now, are ready before the step needs them. A
recovery that changes them costs one synchronous load per new microbatch; batches are
keyed by their sample ids, so a prepared batch is never served for the wrong samples.

Only the half a rank needs is kept (`needs`: inputs on first stages, targets on last
stages); the other is an empty placeholder the engine never reads. Time the engine spends
inside `batch` is counted (`take_wait_s`): compute waiting on data.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from odyssey.data import Sampler

Needs = Callable[[], tuple[bool, bool]]
"""() -> (inputs wanted, targets wanted) under the program this rank runs now."""

_EMPTY = torch.empty(0, dtype=torch.long)


class BatchLoader:
    """Serves `data` by sample id, `depth` steps ahead (0: synchronous, still timed)."""

    def __init__(self, data, sampler: Sampler, depth: int = 2, needs: Needs | None = None):
        self.data = data
        self.sampler = sampler
        self.depth = depth
        self.needs = needs or (lambda: (True, True))
        self._ready: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, bool, bool]] = {}
        self._queue: deque[tuple[int, int]] = deque()
        self._queued: set[tuple[int, int]] = set()
        self._busy: tuple[int, ...] | None = None  # ids the thread is loading now
        self._step = 0  # the latest step asked for: older queued work is stale
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wait_s = 0.0
        self.misses = 0
        """Batches loaded inside the step (not prepared in time, or not foreseen)."""

    def batch(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        key = tuple(sample_ids)
        want_x, want_y = self.needs()
        step, mb = self.sampler.locate(sample_ids[0])
        entry = None
        if self.depth > 0:
            with self._cv:
                self._evict_before(step)
                self._enqueue(step, mb)
                while self._busy == key:
                    self._cv.wait()
                entry = self._ready.pop(key, None)
        if entry is not None and (entry[2] or not want_x) and (entry[3] or not want_y):
            x, y = entry[0], entry[1]
        else:
            self.misses += 1
            x, y = self._load(key, want_x, want_y)[:2]
        self._wait_s += time.perf_counter() - t0
        return x, y

    def take_wait_s(self) -> float:
        """Seconds spent waiting in `batch` since the last call."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- background thread -------------------------------------------------------------
    def _load(self, key: tuple[int, ...], want_x: bool, want_y: bool):
        x, y = self.data.batch(list(key))
        return (x if want_x else _EMPTY), (y if want_y else _EMPTY), want_x, want_y

    def _enqueue(self, step: int, mb: int) -> None:
        for ahead in range(step + 1, step + 1 + self.depth):
            if (ahead, mb) not in self._queued:
                self._queued.add((ahead, mb))
                self._queue.append((ahead, mb))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="odyssey-batch-loader",
                                            daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def _evict_before(self, step: int) -> None:
        """Forget batches of steps already past (microbatches this rank no longer runs)."""
        self._step = max(self._step, step)
        first = self.sampler.samples_before(step)
        for key in [k for k in self._ready if k[0] < first]:
            del self._ready[key]
        self._queued = {q for q in self._queued if q[0] >= step}

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                step, mb = self._queue.popleft()
                if step < self._step:
                    continue
                key = tuple(self.sampler.sample_ids(step, mb))
                if key in self._ready:
                    continue
                self._busy = key
            try:
                entry = self._load(key, *self.needs())
            except Exception:  # the step's own synchronous load will raise it
                entry = None
            with self._cv:
                self._busy = None
                if entry is not None:
                    self._ready[key] = entry
                self._cv.notify_all()

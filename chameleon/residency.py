"""Device residency: accounting, budget guards and copy scheduling for saved storages.

`resident` is the bytes of storages held on the device for autograd (kept, swap-out in
flight, prefetched or recomputed and not yet used). A fetched tensor stops counting once
its last handle has been unpacked: from then on it is autograd's working memory, like
any temporary. The guards keep `resident <= budget` whenever the budget is at least the
largest single saved tensor: before adding bytes they retire finished copies, wait for
in-flight swap-outs, drop prefetched-but-unused copies (at a use), and finally swap out
the oldest kept tensors (the reactive rule). Host copies are freed by reference: an
entry dies when autograd drops its last handle, unpacked or not.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from chameleon.config import SwapConfig
from chameleon.host import Block, HostArena
from chameleon.lanes import BandwidthMeter, Ticket, make_lanes
from planner.swap_timeline import KEEP, SWAP
from profiler.op_monitor import OpMonitor, StageId
from profiler.units import parse_size


@dataclass
class StepStats:
    """Counters of one step (bytes are storage bytes)."""

    peak_resident: int = 0
    """Highest resident saved bytes accounted by the executor."""
    resident_end: int = 0
    """Resident bytes left at step end (graphs still alive)."""
    saved_bytes: int = 0
    """Bytes of distinct storages saved."""
    n_saved: int = 0
    """Distinct storages saved."""
    out_bytes: int = 0
    """Bytes swapped out."""
    in_bytes: int = 0
    """Bytes fetched back."""
    recompute_bytes: int = 0
    """Bytes dropped at pack and recomputed at unpack."""
    n_swapped: int = 0
    """Storages swapped out."""
    n_recompute: int = 0
    """Storages recomputed."""
    sync_fetches: int = 0
    """Fetches done at the moment of use (prefetch missing or late)."""
    reactive_swaps: int = 0
    """Swaps decided by the budget guard rather than the policy."""
    over_budget: int = 0
    """Times a tensor had to be accounted although it did not fit (budget too small)."""
    stall_s: float = 0.0
    """Seconds the executor blocked the step (waits for copies)."""
    recompute_s: float = 0.0
    """Seconds spent recomputing."""
    match_exact: int = 0
    """Storages matched to the policy by exact key."""
    match_structural: int = 0
    """Matched after ignoring the shape class."""
    match_none: int = 0
    """Not matched (reactive rule)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Entry:
    """One saved storage: where its bytes are (device, host, in flight) and its plan."""

    __slots__ = ("ex", "nbytes", "stage", "key", "rec", "mode", "dev", "blk", "out_t", "in_t",
                 "pending", "node", "op", "wref", "version", "alias", "__weakref__")

    def __init__(self, ex: Residency, nbytes: int, stage: StageId, key: Any, version: int) -> None:
        self.ex, self.nbytes, self.stage, self.key, self.version = ex, nbytes, stage, key, version
        self.rec = self.dev = self.blk = self.out_t = self.in_t = None
        self.node = self.op = self.wref = self.alias = None
        self.mode, self.pending = KEEP, 0

    def __del__(self) -> None:
        try:
            self.ex._entry_dead(self)
        except Exception:  # interpreter shutdown
            pass


class Residency:
    """Entries' device/host state, copy lanes, host arena, budget guards and stats."""

    def __init__(self, config: SwapConfig, device: torch.device, monitor: OpMonitor,
                 n_slots: int) -> None:
        self.cfg, self.device, self.mon, self.n_slots = config, device, monitor, n_slots
        self.budget = config.budget_bytes()
        self.arena = HostArena(host_tier(config, device), parse_size(config.host_arena_bytes),
                               config.disk_dir)
        self.lanes = make_lanes(config.lanes, device)
        self.bw = BandwidthMeter()
        self.lock = threading.RLock()
        self.resident = 0
        self.stats = StepStats()
        self._kept: deque = deque()  # weakrefs, oldest first (reactive eviction order)
        self._outs: deque = deque()  # weakrefs with a swap-out in flight, FIFO
        self._deferred: list[tuple[list[Ticket], int, Any, Block | None]] = []
        self._observe: list[Ticket] = []
        self._pending: dict[StageId, list] = {}  # trigger stage -> weakrefs to prefetch
        self._queue: deque = deque()  # prefetches waiting for room
        self._fetched: deque = deque()
        self._bwd_mbs: set[int] = set()
        self._detail_swapped: list = []
        self._stall_depth = 0
        self.calibrate()

    def _u8(self, st: torch.UntypedStorage, n: int) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=self.device).set_(st, 0, (n,), (1,))

    def _add(self, n: int) -> None:
        self.resident += n
        if self.resident > self.stats.peak_resident:
            self.stats.peak_resident = self.resident

    @contextmanager
    def _stalling(self) -> Iterator[None]:
        """Time the step spends waiting on Chameleon; nested waits count once."""
        self._stall_depth += 1
        t0 = time.perf_counter() if self._stall_depth == 1 else None
        try:
            yield
        finally:
            self._stall_depth -= 1
            if t0 is not None:
                dt = time.perf_counter() - t0
                self.stats.stall_s += dt
                self.mon.add_stall(dt)

    def _inline(self, t: Ticket) -> None:
        """Sync lanes copy on the compute thread: that copy time is a stall."""
        if self.lanes.kind == "sync" and self._stall_depth == 0:
            dt = t.seconds() or 0.0
            self.stats.stall_s += dt
            self.mon.add_stall(dt)

    def calibrate(self) -> None:
        """Seed the bandwidth meter; afterwards it learns from every copy."""
        calibrate_copies(self.lanes, self.arena, self.device, int(self.cfg.calibrate_bytes),
                         self.bw)

    def _register(self, e: Entry, trigger: StageId | None, reactive: bool) -> None:
        if trigger is None and reactive:
            trigger = (e.stage[0], min(e.stage[1] + self.cfg.prefetch_ahead, self.n_slots - 1))
        if trigger is not None:
            self._pending.setdefault(trigger, []).append(weakref.ref(e))

    def _swap_out(self, e: Entry) -> None:
        blk = self.arena.alloc(e.nbytes)
        e.blk, e.wref, e.alias = blk, StorageWeakRef(e.dev), None
        e.out_t = self.lanes.out(self._u8(e.dev, e.nbytes), blk)
        self._inline(e.out_t)
        self.stats.out_bytes += e.nbytes
        self.stats.n_swapped += 1
        if e.rec is not None:
            self._detail_swapped.append(weakref.ref(e))
        if e.out_t.done():
            self._out_done(e)
        else:
            self._outs.append(weakref.ref(e))

    def _out_done(self, e: Entry) -> None:
        self.bw.observe(e.out_t)
        if e.dev is not None and e.in_t is None:
            e.dev = None
            self.resident -= e.nbytes

    def _fetch(self, e: Entry) -> None:
        st = torch.empty(e.nbytes, dtype=torch.uint8, device=self.device).untyped_storage()
        after = e.out_t if e.out_t is not None and not e.out_t.done() else None
        e.in_t = self.lanes.inn(e.blk, self._u8(st, e.nbytes), after)
        self._inline(e.in_t)
        e.dev = st
        self._add(e.nbytes)
        self.stats.in_bytes += e.nbytes
        self._fetched.append(weakref.ref(e))

    def _poll(self) -> None:
        """Retire finished copies (never blocks)."""
        if self._deferred:
            items, self._deferred = self._deferred, []
            for item in items:
                if all(t.done() for t in item[0]):
                    self.resident -= item[1]
                    if item[3] is not None:
                        self.arena.free(item[3])
                else:
                    self._deferred.append(item)
        while self._outs:
            e = self._outs[0]()
            if e is None:
                self._outs.popleft()
            elif e.out_t.done():
                self._outs.popleft()
                self._out_done(e)
            else:
                break
        if self._observe:
            keep = [t for t in self._observe if not t.done()]
            for t in self._observe:
                if t.done():
                    self.bw.observe(t)
            self._observe = keep

    def _fits(self, n: int) -> bool:
        return self.resident + n <= self.budget

    def _make_room(self, n: int, evict_kept: bool, evict_fetched: bool = False,
                   protect: Entry | None = None) -> bool:
        if self._fits(n):
            return True
        with self._stalling():
            self._poll()
            while not self._fits(n) and (self._outs or self._deferred):
                e = self._outs[0]() if self._outs else None
                if e is not None:
                    e.out_t.wait()
                elif self._outs:
                    self._outs.popleft()
                else:
                    for t in self._deferred[0][0]:
                        t.wait()
                self._poll()
            while evict_fetched and not self._fits(n) and self._fetched:
                e = self._fetched.pop()()
                if e is None or e.dev is None or e.blk is None or e is protect:
                    continue
                if e.in_t is not None:
                    e.in_t.wait()
                    e.in_t = None
                e.dev = None
                self.resident -= e.nbytes
                self._queue.appendleft(weakref.ref(e))
            while evict_kept and not self._fits(n) and self._kept:
                e = self._kept.popleft()()
                if e is None or e.dev is None or e.blk is not None or e.mode != KEEP \
                        or e.nbytes < self.cfg.min_swap_bytes:
                    continue
                e.mode = SWAP
                self.stats.reactive_swaps += 1
                self._swap_out(e)
                self._register(e, None, reactive=True)
                if not e.out_t.done():
                    e.out_t.wait()
                self._poll()
        return self._fits(n)

    # ---- backward ---------------------------------------------------------------------
    def _issue(self) -> None:
        while self._queue:
            e = self._queue[0]()
            if e is None or e.dev is not None or e.blk is None:
                self._queue.popleft()
                continue
            if not self._fits(e.nbytes):
                self._poll()
                if not self._fits(e.nbytes):
                    break
            self._queue.popleft()
            self._fetch(e)

    def on_bwd_stage(self, mb: int, slot: int) -> None:
        """A stage's backward begins: issue the prefetches it triggers (and overdue ones)."""
        with self.lock:
            self._poll()
            fire = [k for k in self._pending if k[0] < mb or (k[0] == mb and k[1] >= slot)]
            for k in sorted(fire, key=lambda k: (k[0], -k[1])):
                self._queue.extend(self._pending.pop(k))
            self._issue()

    def _wait_in(self, e: Entry) -> None:
        if e.in_t is not None:
            with self._stalling():
                self.lanes.device_wait(e.in_t)
            self._observe.append(e.in_t)
            e.in_t = None

    # ---- lifecycle --------------------------------------------------------------------
    def _entry_dead(self, e: Entry) -> None:
        with self.lock:
            if e.rec is not None:
                self.mon.note_free(e.rec)
            busy = [t for t in (e.out_t, e.in_t) if t is not None and not t.done()]
            n_res = e.nbytes if e.dev is not None else 0
            if busy:
                self._deferred.append((busy, n_res, e.dev, e.blk))
            else:
                self.resident -= n_res
                if e.blk is not None:
                    self.arena.free(e.blk)

    def begin_step(self) -> None:
        with self.lock:
            self._poll()
            self.stats = StepStats(peak_resident=self.resident)
            self._bwd_mbs.clear()

    def end_step(self, drain: bool | None = None) -> StepStats:
        """Close the step; with drain (default off CUDA) wait for copies still in flight."""
        with self.lock:
            self._poll()
            if drain if drain is not None else self.lanes.kind != "cuda":
                for item in list(self._deferred):
                    for t in item[0]:
                        t.wait()
                for wr in list(self._outs):
                    e = wr()
                    if e is not None:
                        e.out_t.wait()
                self._poll()
            self._pending.clear()
            self._queue.clear()
            self._fetched.clear()
            self._detail_swapped.clear()
            self._kept = deque(wr for wr in self._kept if wr() is not None)
            self.stats.resident_end = self.resident
            return self.stats

    def close(self) -> None:
        self.lanes.close()


def host_tier(config: SwapConfig, device: torch.device) -> str:
    """The host tier `config` means on `device` ("auto": pinned on CUDA, else disk)."""
    if config.tier != "auto":
        return config.tier
    return "pinned" if device.type == "cuda" else "disk"


def calibrate_copies(lanes: Any, arena: HostArena, device: torch.device, nbytes: int,
                     meter: BandwidthMeter) -> None:
    """Seed `meter` with the best of two `nbytes` copies each way after a warm-up copy."""
    if nbytes <= 0:
        return
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    blk = arena.alloc(nbytes)
    best: dict[str, Ticket] = {}
    for i in range(3):
        t = lanes.out(src, blk)
        t.wait()
        t2 = lanes.inn(blk, dst, None)
        t2.wait()
        for tk in (t, t2):
            s, old = tk.seconds(), best.get(tk.direction)
            if i and s is not None and (old is None or s < (old.seconds() or 1e9)):
                best[tk.direction] = tk
    for tk in best.values():
        meter.observe(tk)
    arena.free(blk)


def copy_bandwidth(config: SwapConfig, device: torch.device) -> dict[str, float]:
    """Bytes/s each way ("out" to host, "in" back) of the copies Chameleon would run for
    `config` on `device`: its start-up calibration, run on its own (what the planner
    prices swapping with before any rank swaps)."""
    arena = HostArena(host_tier(config, device), int(config.calibrate_bytes), config.disk_dir)
    lanes = make_lanes(config.lanes, device)
    meter = BandwidthMeter()
    try:
        calibrate_copies(lanes, arena, device, int(config.calibrate_bytes), meter)
    finally:
        lanes.close()
    return dict(meter.Bps)

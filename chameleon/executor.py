"""Executor: saved-tensor pack/unpack hooks that keep, swap or recompute activations.

One `Entry` per saved *storage* (views are deduplicated: several saved views of one
storage share one entry and one host copy; the entry remembers the version counter so
an in-place-modified storage is never confused with its old contents). Each pack
returns a small `_Handle` (entry + view geometry); unpack rebuilds the exact view
(same bytes, sizes, strides: bitwise-identical gradients). Parameters, tensors of other
devices, tensor subclasses and packs during backward pass through untouched.
Residency (accounting, guards, copies) lives in `chameleon.residency`.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from chameleon.config import SwapConfig
from chameleon.recompute import recompute, saved_input
from chameleon.residency import Entry, Residency, StepStats
from planner.swap_policy import Policy
from planner.swap_timeline import KEEP, RECOMPUTE, SWAP
from profiler.op_monitor import OpMonitor, recompute_op

__all__ = ["Executor", "StepStats"]


class _Handle:
    __slots__ = ("e", "off", "size", "stride", "dtype", "done", "direct")

    def __init__(self, e: Entry, t: torch.Tensor) -> None:
        self.e, self.off, self.size, self.stride = e, t.storage_offset(), t.shape, t.stride()
        self.dtype, self.done, self.direct = t.dtype, False, False


class Executor(Residency):
    """The hooks: `pack`/`unpack` for torch.autograd.graph.saved_tensors_hooks, and
    `on_bwd_stage` for the stage tracker's backward pre-hooks."""

    def __init__(self, config: SwapConfig, device: torch.device, monitor: OpMonitor,
                 params: set[int], n_slots: int) -> None:
        super().__init__(config, device, monitor, n_slots)
        self.params = params
        self.policy: Policy | None = None
        self._by_ptr: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._peek = 0  # 1: peek without fetching, 2: peek and fetch (recompute source)
        self._peeked: Entry | None = None

    def pack(self, t: torch.Tensor) -> Any:
        if self._peek or type(t) is not torch.Tensor or t.device != self.device \
                or t.layout != torch.strided or t.is_conj() or t.is_neg():
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self.params or torch._C._current_graph_task_id() >= 0:
            return t
        self.mon.note_pack(t)
        with self.lock:
            e = self._by_ptr.get(ptr)
            h = None
            # An entry found by address is this tensor only while the storage it was made
            # for is alive: once that storage is freed (swapped out; maybe fetched back
            # into a new one) the allocator may hand its address to an unrelated tensor.
            if e is None or e.version != t._version or (
                    e.wref.expired() if e.wref is not None else e.dev is None):
                e = self._new_entry(t, st, ptr)
                h = _Handle(e, t)
                if e.mode == KEEP and e.dev is not None:  # fast unpack while resident
                    e.alias, h.direct = t.detach(), True
            e.pending += 1
            return h if h is not None else _Handle(e, t)

    def _new_entry(self, t: torch.Tensor, st: torch.UntypedStorage, ptr: int) -> Entry:
        mon, stats, n = self.mon, self.stats, st.nbytes()
        key = mon.make_key(t)
        e = Entry(self, n, mon.stage, key, t._version)
        e.dev = st
        self._by_ptr[ptr] = e
        stats.n_saved += 1
        stats.saved_bytes += n
        if mon.detailed:
            e.rec = mon.record(key, n, t)
            if e.rec.recompute is not None:
                self._find_src(e, t)
        action, level = self.policy.lookup(key) if self.policy is not None else (None, 0)
        if level == 2:
            stats.match_exact += 1
        elif level == 1:
            stats.match_structural += 1
        else:
            stats.match_none += 1
        mode = action.mode if action is not None else KEEP
        if n < self.cfg.min_swap_bytes:
            mode = KEEP
        if mode == RECOMPUTE:
            op = recompute_op(t, n) if self.cfg.recompute else None
            if op is not None:
                base = t._base if t._base is not None else t
                e.node, e.op, e.mode, e.wref, e.dev = base.grad_fn, op, RECOMPUTE, \
                    StorageWeakRef(st), None
                stats.n_recompute += 1
                stats.recompute_bytes += n
                return e
            mode, action = SWAP, None
        e.mode = mode
        if mode == SWAP:
            self._make_room(n, evict_kept=True)
            self._add(n)
            self._swap_out(e)
            self._register(e, action.prefetch_stage if action is not None else None,
                           reactive=action is None)
        elif self._make_room(n, evict_kept=True):
            self._add(n)
            self._kept.append(weakref.ref(e))
        elif n >= self.cfg.min_swap_bytes:  # reactive: this one goes
            stats.reactive_swaps += 1
            e.mode = SWAP
            self._add(n)
            self._swap_out(e)
            self._register(e, None, reactive=True)
            if not e.out_t.done():  # nothing else to free: wait for this copy
                with self._stalling():
                    e.out_t.wait()
                    self._poll()
        else:
            stats.over_budget += 1
            self._add(n)
        return e

    def _find_src(self, e: Entry, t: torch.Tensor) -> None:
        """Detailed mode: which saved storage the recomputable tensor derives from (the
        producer's saved input is read through our own unpack hook in peek mode)."""
        base = t._base if t._base is not None else t
        self._peek, self._peeked = 1, None
        try:
            saved_input(base.grad_fn)
        except RuntimeError:  # graph already freed: source unknown, no recompute
            pass
        finally:
            self._peek = 0
        src, self._peeked = self._peeked, None
        if src is not None and src.rec is not None:
            e.rec.recompute_src = src.rec.rid

    def _first_unpack(self, mb: int) -> None:
        self._bwd_mbs.add(mb)
        for wr in self._detail_swapped:
            e = wr()
            if e is not None and e.stage[0] == mb and e.dev is None and e.rec is not None \
                    and e.wref is not None and not e.wref.expired():
                e.rec.aliased = True
        self.mon.bwd_stage(mb, self.n_slots - 1)
        self.on_bwd_stage(mb, self.n_slots - 1)

    def unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Handle):
            return h
        e = h.e
        with self.lock:
            if self._peek:
                return self._peek_view(h)
            self._poll()
            if e.stage[0] not in self._bwd_mbs:
                self._first_unpack(e.stage[0])
            if e.rec is not None:
                self.mon.note_unpack(e.rec)
            if e.dev is None:
                if e.mode == RECOMPUTE:
                    self._recompute(e)
                else:
                    with self._stalling():
                        self._make_room(e.nbytes, evict_kept=True, evict_fetched=True)
                        self._fetch(e)
                    self.stats.sync_fetches += 1
            self._wait_in(e)
            if h.direct and e.alias is not None:
                v = e.alias
            else:
                v = torch.empty(0, dtype=h.dtype, device=self.device).set_(
                    e.dev, h.off, h.size, h.stride)
            if not h.done:
                h.done = True
                e.pending -= 1
            if e.pending <= 0 and e.mode != KEEP and e.dev is not None and \
                    (e.out_t is None or e.out_t.done()):
                e.dev = None
                self.resident -= e.nbytes
            self._issue()
            return v

    def _peek_view(self, h: _Handle) -> torch.Tensor:
        e = self._peeked = h.e
        if e.dev is None:
            if self._peek != 2:
                return torch.empty(0, dtype=h.dtype, device=self.device)
            with self._stalling():
                self._make_room(e.nbytes, evict_kept=True, evict_fetched=True)
                self._fetch(e)
            self.stats.sync_fetches += 1
        self._wait_in(e)
        return torch.empty(0, dtype=h.dtype, device=self.device).set_(
            e.dev, h.off, h.size, h.stride)

    def _recompute(self, e: Entry) -> None:
        self._peek, self._peeked = 2, None
        try:
            x = saved_input(e.node)  # the source: fetched first if it is swapped out
        finally:
            self._peek = 0
        self._make_room(e.nbytes, evict_kept=True, evict_fetched=True, protect=self._peeked)
        self._peeked = None
        t0 = time.perf_counter()
        y = recompute(e.op, e.node, x)
        st = y.untyped_storage()
        if st.nbytes() != e.nbytes:
            raise RuntimeError(f"recomputed {e.op} has {st.nbytes()} bytes, saved had {e.nbytes}")
        e.dev = st
        self._add(e.nbytes)
        dt = time.perf_counter() - t0
        self.stats.recompute_s += dt
        if self._stall_depth == 0:  # recompute is not in the profiled compute timeline
            self.mon.add_stall(dt)

"""Online op monitor: watches the tensors autograd saves, per stage, in eager mode.

A *stage* is (microbatch, layer slot): slot 0 is everything before the first layer,
slot i + 1 is layer i, slot L + 1 is everything after the last layer (head, loss).
Two modes:

* **light** (always on): per forward stage, the count of saved tensors and a hash of
  their shapes and dtypes (the stage *signature*), plus one timestamp per stage boundary
  in forward and backward.
* **detailed** (only when needed): one `SavedRecord` per saved storage: bytes, a tolerant
  key, pack time (the gaps between packs are the compute available to hide copies),
  first/last unpack time and order in backward, and the time it was freed.

Signatures are compared stage by stage (never by total count) with the previous step;
`changed` lists the stages that differ. A caller (Chameleon) decides from that whether
the next step must be detailed. This module imports neither `chameleon` nor `odyssey`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from profiler.step_profile import SavedRecord, StageId, StepProfile, TensorKey, shape_class

__all__ = ["OpMonitor", "OpMonitorConfig", "SavedRecord", "StageId", "StageTracker",
           "StepProfile", "TensorKey", "find_layers", "param_storages", "recompute_op",
           "shape_class"]

_DTYPES: dict[torch.dtype, str] = {}

RECOMPUTABLE: dict[str, str] = {"GeluBackward0": "gelu", "SiluBackward0": "silu"}
"""Producer node kinds whose output can be recomputed from the input the node saves."""


@dataclass
class OpMonitorConfig:
    """Settings of the op monitor."""

    detail_first_step: bool = True
    """The first step is profiled in detail (nothing is known yet)."""
    detail_on_change: bool = True
    """Request a detailed step after any stage's signature changed."""


def recompute_op(t: torch.Tensor, nbytes: int) -> str | None:
    """The pointwise op that can recompute t's whole storage from its producer's saved
    input (None if t is not such an output or does not own its whole storage)."""
    b = t._base if t._base is not None else t
    gf = b.grad_fn
    op = RECOMPUTABLE.get(type(gf).__name__) if gf is not None else None
    if op is None or not b.is_contiguous() or b.storage_offset() != 0:
        return None
    return op if b.numel() * b.element_size() == nbytes else None


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The model's largest nn.ModuleList (transformer blocks), else its direct children."""
    best: nn.ModuleList | None = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best)):
            best = m
    return list(best) if best is not None else list(model.children())


def param_storages(model: nn.Module) -> set[int]:
    """data_ptrs of parameter and buffer storages (saved views of them are skipped)."""
    out = set()
    for t in list(model.parameters()) + list(model.buffers()):
        p = t.untyped_storage().data_ptr()
        if p:
            out.add(p)
    return out


def _first_grad_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.grad_fn is not None else None
    if isinstance(out, (list, tuple)):
        items = out
    elif isinstance(out, dict):
        items = list(out.values())
    else:
        return None
    for o in items:
        t = _first_grad_tensor(o)
        if t is not None:
            return t
    return None


class OpMonitor:
    """Per-stage saved-tensor monitor. Feed it stage boundaries (`StageTracker`) and
    packs/unpacks (its own hooks via `step()`, or a swap executor's)."""

    def __init__(self, config: OpMonitorConfig | None = None) -> None:
        self.config = config or OpMonitorConfig()
        self.step_count = 0
        self.detailed = False
        self.detail_requested = self.config.detail_first_step
        self.active = False
        self.last: StepProfile | None = None
        self.changed: list[StageId] = []
        self.n_detailed_steps = 0
        self.mb = -1
        self.stage: StageId = (0, 0)
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.perf_counter()
        self._stall = 0.0
        self._last_now = 0.0
        self._sig: dict[StageId, list[int]] = {}
        self._cur = self._sig.setdefault((0, 0), [0, 0])
        self._kind_count: dict[tuple, int] = {}
        self._fwd_t: dict[StageId, float] = {}
        self._bwd_t: dict[StageId, float] = {}
        self._n_unpacks = 0
        self.records: list[SavedRecord] = []

    # ---- step lifecycle -------------------------------------------------------------
    def begin_step(self, detailed: bool | None = None) -> None:
        """Start a step; detailed=None uses the pending request (first step / change)."""
        self._reset()
        self.detailed = self.detail_requested if detailed is None else detailed
        self.mb, self.stage, self.active = -1, (0, 0), True

    def end_step(self) -> StepProfile:
        """Close the step, compare signatures per stage with the previous step."""
        prof = StepProfile(
            step=self.step_count, detailed=self.detailed, step_time=self.now(),
            signatures={k: (v[0], v[1]) for k, v in self._sig.items() if v[0]},
            fwd_t=dict(self._fwd_t), bwd_t=dict(self._bwd_t),
            records=self.records if self.detailed else [], stall_s=self._stall)
        self.changed = prof.changed_stages(self.last) if self.last is not None else []
        if self.detailed:
            self.n_detailed_steps += 1
        self.detail_requested = bool(self.changed) and self.config.detail_on_change
        self.last, self.active = prof, False
        self.step_count += 1
        return prof

    def now(self) -> float:
        """Seconds since step start minus reported stalls (never decreasing)."""
        t = time.perf_counter() - self._t0 - self._stall
        if t < self._last_now:
            return self._last_now
        self._last_now = t
        return t

    def add_stall(self, seconds: float) -> None:
        """Executor time spent waiting (excluded from the compute timeline)."""
        self._stall += seconds

    # ---- stage boundaries ------------------------------------------------------------
    def new_microbatch(self) -> None:
        self.mb += 1
        self.enter_stage(0)

    def enter_stage(self, slot: int) -> None:
        sid = (max(self.mb, 0), slot)
        self.stage = sid
        cur = self._sig.get(sid)
        if cur is None:
            cur = self._sig[sid] = [0, 0]
            self._fwd_t[sid] = self.now()
        self._cur = cur

    def bwd_stage(self, mb: int, slot: int) -> None:
        if self.active and (mb, slot) not in self._bwd_t:
            self._bwd_t[(mb, slot)] = self.now()

    # ---- saved tensors ---------------------------------------------------------------
    def note_pack(self, t: torch.Tensor) -> None:
        """Light mode: fold the tensor into the current stage signature (~1 us)."""
        c = self._cur
        c[0] += 1
        c[1] = hash((c[1], t.shape, t.dtype))

    def make_key(self, t: torch.Tensor) -> TensorKey:
        """Tolerant key; the kind is the producer of the storage (a view's base)."""
        base = t._base
        gf = (base if base is not None else t).grad_fn
        kind = type(gf).__name__ if gf is not None else "leaf"
        ck = (self.stage, kind)
        idx = self._kind_count.get(ck, 0)
        self._kind_count[ck] = idx + 1
        dt = _DTYPES.get(t.dtype)
        if dt is None:
            dt = _DTYPES[t.dtype] = str(t.dtype).removeprefix("torch.")
        return TensorKey(self.stage, kind, idx, (t.dim(), max(0, (t.numel() - 1).bit_length())),
                         dt)

    def record(self, key: TensorKey, nbytes: int, t: torch.Tensor) -> SavedRecord:
        """Detailed mode: a new record for a storage saved for the first time."""
        rec = SavedRecord(len(self.records), key, nbytes, self.now())
        rec.recompute = recompute_op(t, nbytes)
        self.records.append(rec)
        return rec

    def note_unpack(self, rec: SavedRecord) -> None:
        now = self.now()
        if rec.unpack_t is None:
            rec.unpack_t, rec.unpack_order = now, self._n_unpacks
            self._n_unpacks += 1
        rec.last_unpack_t = now

    def note_free(self, rec: SavedRecord) -> None:
        if self.active and rec.free_t is None:
            rec.free_t = self.now()

    # ---- standalone use ------------------------------------------------------------------
    def attach(self, model: nn.Module, layers: Sequence[nn.Module] | None = None
               ) -> StageTracker:
        """Install stage hooks on `model` (call once); returns the tracker (remove())."""
        self._tracker = StageTracker(model, layers, self)
        self._params = param_storages(model)
        return self._tracker

    @contextmanager
    def step(self, detailed: bool | None = None) -> Iterator[OpMonitor]:
        """Monitor one training step on its own (after `attach`); no swapping."""
        tracker, params = self._tracker, self._params

        peeked: list[SavedRecord] = []

        def pack(t: torch.Tensor) -> Any:
            if peeked or t.untyped_storage().data_ptr() in params:
                return t
            self.note_pack(t)
            if not self.detailed:
                return t
            rec = self.record(self.make_key(t), t.untyped_storage().nbytes(), t)
            if rec.recompute is not None:  # which record holds the producer's input
                peeked.append(rec)
                try:
                    b = t._base if t._base is not None else t
                    _ = b.grad_fn._saved_self  # runs our unpack hook in peek mode
                except RuntimeError:  # graph already freed: source unknown
                    pass
                finally:
                    peeked.pop(0)
                    if peeked:
                        rec.recompute_src = peeked.pop().rid
            return _Watched(self, rec, t)

        def unpack(x: Any) -> torch.Tensor:
            if isinstance(x, _Watched):
                if peeked:
                    peeked.append(x.rec)
                else:
                    self.note_unpack(x.rec)
                return x.t
            return x

        self.begin_step(detailed)
        tracker.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield self
        finally:
            tracker.active = False
            self.end_step()


class _Watched:
    __slots__ = ("mon", "rec", "t")

    def __init__(self, mon: OpMonitor, rec: SavedRecord, t: torch.Tensor) -> None:
        self.mon, self.rec, self.t = mon, rec, t

    def __del__(self) -> None:
        self.mon.note_free(self.rec)


class StageTracker:
    """Module hooks that tell an `OpMonitor` (and an optional listener) where forward and
    backward are: root forward = new microbatch, layer forward pre-hook = stage entry, a
    pre-hook on each layer output's autograd node = that stage's backward begins."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module] | None,
                 monitor: OpMonitor, on_bwd_stage: Any = None) -> None:
        self.monitor, self.on_bwd_stage, self.active = monitor, on_bwd_stage, False
        self.layers = list(layers) if layers is not None else find_layers(model)
        self.n_slots = len(self.layers) + 2
        last = len(self.layers)
        self._handles = [model.register_forward_pre_hook(self._root_pre),
                         model.register_forward_hook(self._after(last + 1, last + 1))]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i + 1)))
            nxt = last + 1 if i == last - 1 else None
            self._handles.append(layer.register_forward_hook(self._after(i + 1, nxt)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        if self.active and not torch._C._current_graph_task_id() >= 0:
            self.monitor.new_microbatch()

    def _pre(self, slot: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self.active:
                self.monitor.enter_stage(slot)
        return hook

    def _after(self, slot: int, next_slot: int | None) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.active:
                return
            mb = max(self.monitor.mb, 0)
            t = _first_grad_tensor(out)
            if t is not None:
                t.grad_fn.register_prehook(self._bwd_hook(mb, slot))
            if next_slot is not None:
                self.monitor.enter_stage(next_slot)
        return hook

    def _bwd_hook(self, mb: int, slot: int) -> Any:
        def hook(grad_outputs: Any) -> None:
            self.monitor.bwd_stage(mb, slot)
            if self.on_bwd_stage is not None:
                self.on_bwd_stage(mb, slot)
        return hook

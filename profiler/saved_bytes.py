"""Bytes autograd saves for backward, per layer, measured while a job trains.

The planner's memory model needs what each layer keeps alive per microbatch until its
backward; the boundary activation alone understates it many times over (a transformer
block saves a dozen tensors). `SavedBytesMeter` counts it with saved-tensor hooks that
return the tensor itself (no copy, numerics unchanged), by the rule Chameleon's executor
budgets by, so a budget the planner computes is one Chameleon can enforce: each saved
*storage* once (views share it), parameters not counted, nothing saved during backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class SavedBytesMeter:
    """Counts saved-for-backward bytes inside `step()`, attributed by `mark(layer)`."""

    def __init__(self) -> None:
        self.params: set[int] = set()
        self._seen: dict[int, StorageWeakRef] = {}
        self._since_mark = 0
        self._bytes: dict[int, int] = {}
        self._marks: dict[int, int] = {}

    @contextmanager
    def step(self, params: set[int]) -> Iterator[SavedBytesMeter]:
        """Count during one training step; `params`: addresses of parameter and buffer
        storages (`profiler.op_monitor.param_storages`, as Chameleon skips them)."""
        self.params, self._seen, self._since_mark = params, {}, 0
        self._bytes, self._marks = {}, {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield self

    def start(self) -> None:
        """A stage's forward begins: what was saved before it is not a layer's."""
        self._since_mark = 0

    def mark(self, layer: int) -> None:
        """Bytes saved since the last mark belong to one microbatch of `layer`."""
        self._bytes[layer] = self._bytes.get(layer, 0) + self._since_mark
        self._marks[layer] = self._marks.get(layer, 0) + 1
        self._since_mark = 0

    def per_microbatch(self, layers: range) -> list[float] | None:
        """Mean saved bytes per microbatch of each of `layers` this step (None: a layer
        ran no forward in it)."""
        if any(self._marks.get(i, 0) == 0 for i in layers):
            return None
        return [self._bytes[i] / self._marks[i] for i in layers]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if type(t) is not torch.Tensor or t.layout != torch.strided \
                or torch._C._current_graph_task_id() >= 0:
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self.params:
            return t
        seen = self._seen.get(ptr)
        if seen is None or seen.expired():  # a freed storage's address may come back
            self._seen[ptr] = StorageWeakRef(st)
            self._since_mark += st.nbytes()
        return t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


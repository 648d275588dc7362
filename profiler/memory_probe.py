"""Bytes one rank really holds, counted from outside the engine (no allocator stats).

`MemoryProbe` tracks the tensors autograd saves for backward inside watched layers
(saved-tensor hooks; parameters excluded) and their outputs, by weak reference, counting
each storage once however many views share it; at every probe it records the live
activation and gradient bytes, and the per-step maxima are the measured peaks. On CPU
`torch.cuda.max_memory_allocated` says nothing, so this is what validates the memory
model (`benchmarks/model_accuracy.py`).
"""

from __future__ import annotations

import weakref

import torch


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(tensor_bytes(v) for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


class MemoryProbe:
    """Counts one rank's live activation bytes through saved-tensor hooks.

    Tracked: every tensor autograd saves for backward inside a watched layer (or the
    loss) except parameters, and every watched layer's output (a stage's output buffer
    stays alive until its backward). A tracked tensor counts while it is alive
    (weak reference); storages are counted once however many views share them. At each
    probe (every save, every layer output, every optimizer step) the live activation
    bytes and the gradient bytes then allocated are recorded; the per-step maxima are
    the measured peaks.
    """

    def __init__(self):
        self._live: dict[int, tuple[weakref.ref, int, int]] = {}
        self._param_ptrs: set[int] = set()
        self._params: list[torch.nn.Parameter] = []
        self.step = -1
        self.peaks: dict[int, dict[str, int]] = {}

    # -- registration
    def watch_layer(self, layer: torch.nn.Module, track_output: bool = True) -> torch.nn.Module:
        for p in layer.parameters():
            self._param_ptrs.add(p.untyped_storage().data_ptr())
            self._params.append(p)
        ctx: list = []

        def pre(_mod, _args):
            c = torch.autograd.graph.saved_tensors_hooks(self.pack, unpack)
            c.__enter__()
            ctx.append(c)

        def post(_mod, _args, out):
            ctx.pop().__exit__(None, None, None)
            if track_output and isinstance(out, torch.Tensor):
                self.track(out)
            self.probe()

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
        return layer

    # -- accounting
    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self._param_ptrs:
            self.track(t)
        self.probe()
        return t

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.nbytes():
            self._live[id(t)] = (weakref.ref(t), st.data_ptr(), st.nbytes())

    def activation_bytes(self) -> int:
        storages: dict[int, int] = {}
        for key, (ref, ptr, nbytes) in list(self._live.items()):
            if ref() is None:
                del self._live[key]
            else:
                storages[ptr] = nbytes
        return sum(storages.values())

    def grad_bytes(self) -> int:
        return sum(tensor_bytes(p.grad) for p in self._params)

    def param_bytes(self) -> int:
        return unique_storage_bytes(self._params)

    def probe(self) -> None:
        act, grads = self.activation_bytes(), self.grad_bytes()
        pk = self.peaks.setdefault(self.step, {"activations": 0, "grads": 0, "dynamic": 0})
        pk["activations"] = max(pk["activations"], act)
        pk["grads"] = max(pk["grads"], grads)
        pk["dynamic"] = max(pk["dynamic"], act + grads)


def unpack(t: torch.Tensor) -> torch.Tensor:
    """The identity unpack hook paired with `MemoryProbe.pack`."""
    return t

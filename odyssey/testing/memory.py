"""Bytes each rank of a job really holds, measured with the ranks as threads of one process.

`measure_memory` runs a few steps of a `LayeredModel` under the `Trainer` (ranks as
threads, `threads.run_threads`) with every layer and the loss instrumented by a
`profiler.memory_probe.MemoryProbe` of the calling rank, and returns per-rank bytes of
parameters, gradients, optimizer state and activations at their peak. The engine is
instrumented from outside (module hooks, a global optimizer hook); it is not modified.
Used by `benchmarks/model_accuracy.py` to check the memory model.
"""

from __future__ import annotations

import threading

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from odyssey.job_config import job_config
from odyssey.model import LayeredModel
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from profiler.memory_probe import MemoryProbe, optimizer_state_bytes, unpack

_CURRENT = threading.local()


def instrumented_model(model, probes: dict[int, MemoryProbe]):
    """A copy of a `LayeredModel` whose layers and loss report to the calling rank's
    `MemoryProbe` (`_CURRENT.rank` is set by the rank's thread)."""
    n = model.num_layers

    def build_layer(i: int):
        layer = model.build_layer(i)
        # the model's last layer feeds the loss: its output is not a stage output buffer
        return probes[_CURRENT.rank].watch_layer(layer, track_output=i < n - 1)

    def loss_fn(out, target):
        probe = probes[_CURRENT.rank]
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, unpack):
            return model.loss_fn(out, target)

    return LayeredModel(model.name, n, build_layer, loss_fn, model.activation_spec)


def measure_memory(model, data, plan_cfg, world: int, steps: int = 3,
                   timeout_s: float = 300.0) -> dict[int, dict]:
    """Run `steps` steps with ranks as threads; return per-rank measured bytes (from the
    last step: parameters, gradients and optimizer state exist, activations are at their
    steady peak)."""
    probes = {r: MemoryProbe() for r in range(world)}
    inst = instrumented_model(model, probes)
    cfg = job_config(plan_cfg, steps=steps)

    def before_optimizer_step(*_):  # every gradient exists, no activation does
        rank = getattr(_CURRENT, "rank", None)
        if rank in probes:
            probes[rank].probe()

    def worker(w):
        _CURRENT.rank = w.rank
        torch.set_num_threads(1)
        tr = Trainer(inst, data, cfg, w)
        probe = probes[w.rank]
        eng = tr.engine
        run_step = eng.run_step

        def counted(step):
            probe.step = step
            return run_step(step)

        eng.run_step = counted
        tr.fit()
        last = steps - 1
        pk = probe.peaks.get(last, {"activations": 0, "grads": 0, "dynamic": 0})
        params = probe.param_bytes()
        opt = sum(optimizer_state_bytes(eng.held.optimizer(i)) for i in eng.held.ids)
        return {"params": params, "grads": pk["grads"], "optimizer": opt,
                "activations": pk["activations"],
                "categories_total": params + pk["grads"] + opt + pk["activations"],
                "peak_total": params + opt + pk["dynamic"]}

    handle = register_optimizer_step_pre_hook(before_optimizer_step)
    try:
        return dict(enumerate(run_threads(world, worker, timeout_s)))
    finally:
        handle.remove()

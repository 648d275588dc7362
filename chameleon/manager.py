"""SwapManager: the object API an engine wires in, and the `swap()` context manager.

Per step: light monitoring always; a detailed step when the monitor saw a stage
signature it has no policy for (first step, sequence change, MoE routing change,
skipped block); after a detailed step the policy is regenerated and cached under the
step signature, so recurring shapes reuse their policy without re-profiling.
"""

from __future__ import annotations

import errno
import gc
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chameleon.config import SwapConfig
from chameleon.executor import Executor, StepStats
from planner.swap_policy import BudgetError, Policy, PolicyConfig, generate_policy
from profiler.op_monitor import OpMonitor, StageId, StageTracker, StepProfile, param_storages


def is_oom(exc: BaseException) -> bool:
    """True for device or host out-of-memory errors (CUDA OOM, CPU allocator, mmap)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in msg for s in ("out of memory", "can't allocate memory", "not enough memory"))


@dataclass
class StepReport:
    """What happened in one step."""

    step: int
    """Manager step counter."""
    detailed: bool
    """Whether the detailed profiler ran."""
    changed_stages: list[StageId]
    """Stages whose signature differed from the previous step."""
    policy_source: str
    """"none" (reactive only), "kept", "generated" (regenerated now) or "cache"."""
    policy_generation: int
    """Generation of the policy in force after this step."""
    budget: int
    """Working budget during the step."""
    wall_s: float
    """Wall time of the step context."""
    stats: StepStats = field(default_factory=StepStats)
    """Executor counters."""


class SwapManager:
    """Chameleon for one model. Engine use::

        mgr = SwapManager(model, SwapConfig(budget="6GiB"))
        for batch in data:
            with mgr.step_context():          # forward + backward of all microbatches
                loss = model(batch).loss; loss.backward()
            opt.step()
        # or, with out-of-memory redo: mgr.run_step(train_step, batch)
    """

    def __init__(self, model: nn.Module, config: SwapConfig | None = None,
                 device: torch.device | str | None = None) -> None:
        self._model = weakref.ref(model)  # swap()'s registry is keyed weakly on the model
        self.config = config or SwapConfig()
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.budget = self.config.budget_bytes()
        self.work_budget = self.budget
        self.monitor = OpMonitor()
        self.tracker = StageTracker(model, self.config.layers, self.monitor)
        self.executor = Executor(self.config, device, self.monitor, param_storages(model),
                                 self.tracker.n_slots)
        self.tracker.on_bwd_stage = self.executor.on_bwd_stage
        self.policy_config = PolicyConfig(min_swap_bytes=self.config.min_swap_bytes,
                                          recompute=self.config.recompute,
                                          prefetch_slack=self.config.prefetch_slack)
        self.policy: Policy | None = None
        self.profile: StepProfile | None = None
        self.generation = 0
        self.ooms = 0
        self.history: list[StepReport] = []
        self.events: list[dict[str, Any]] = []
        self._cache: OrderedDict[int, Policy] = OrderedDict()
        self._step = 0

    @property
    def model(self) -> nn.Module:
        m = self._model()
        if m is None:
            raise RuntimeError("the model of this SwapManager has been garbage-collected")
        return m

    # ---- per step ----------------------------------------------------------------------
    @contextmanager
    def step_context(self) -> Iterator[SwapManager]:
        """Wrap one training step (forward and backward of every microbatch)."""
        ex, mon = self.executor, self.monitor
        ex.budget, ex.policy = self.work_budget, self.policy
        ex.params = param_storages(self.model)
        every = self.config.detail_every
        detailed = mon.detail_requested or bool(every and self._step and self._step % every == 0)
        mon.begin_step(detailed)
        ex.begin_step()
        self.tracker.active = True
        t0, ok = time.perf_counter(), False
        try:
            with torch.autograd.graph.saved_tensors_hooks(ex.pack, ex.unpack):
                yield self
            ok = True
        except BaseException as exc:
            if is_oom(exc):
                self._on_oom(exc)
            raise
        finally:
            self.tracker.active = False
            stats = ex.end_step()
            prof = mon.end_step()
            wall = time.perf_counter() - t0
            if not ok:
                mon.detail_requested = True
                self._step += 1
        self._after_step(prof, stats, wall)

    def run_step(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args) inside step_context; on out-of-memory, restore gradients, swap
        more (lower working budget, regenerated policy) and redo the step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = None
        if self.config.oom_retries > 0 and any(p.grad is not None for p in params):
            saved = [None if p.grad is None else p.grad.detach().to("cpu", copy=True)
                     for p in params]
        for attempt in range(self.config.oom_retries + 1):
            try:
                with self.step_context():
                    return fn(*args, **kwargs)
            except BaseException as exc:
                if attempt >= self.config.oom_retries or not is_oom(exc):
                    raise
            for i, p in enumerate(params):  # nothing lost: gradients as before the step
                if saved is None or saved[i] is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = saved[i].to(p.device)
                else:
                    p.grad.copy_(saved[i])
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- policy ------------------------------------------------------------------------
    def _after_step(self, prof: StepProfile, stats: StepStats, wall: float) -> None:
        mon, source = self.monitor, "kept" if self.policy is not None else "none"
        sig = prof.signature()
        if prof.detailed and prof.records:
            self.profile = prof
            self._regenerate(prof)  # may raise BudgetError (state is consistent)
            self._cache[sig] = self.policy  # type: ignore[assignment]
            if len(self._cache) > self.config.policy_cache:
                self._cache.popitem(last=False)
            mon.detail_requested, source = False, "generated"
        elif mon.changed:
            cached = self._cache.get(sig)
            if cached is not None:
                self.policy, mon.detail_requested, source = cached, False, "cache"
            self.events.append({"step": self._step, "event": "signature_change",
                                "stages": list(mon.changed), "cached": cached is not None})
        self.history.append(StepReport(self._step, prof.detailed, list(mon.changed), source,
                                       self.generation, self.work_budget, wall, stats))
        self._step += 1

    def _regenerate(self, prof: StepProfile) -> None:
        bw = self.executor.bw
        pol = generate_policy(prof, self.work_budget, bw.get("out"), bw.get("in"),
                              self.policy_config)
        self.generation += 1
        pol.generation = self.generation
        self.policy = pol
        self.executor.arena.reserve(int(pol.predicted.out_bytes * 1.1))

    def _on_oom(self, exc: BaseException) -> None:
        self.ooms += 1
        held = self.executor.stats.peak_resident or self.work_budget
        new = max(1, int(min(self.work_budget, held) * self.config.oom_shrink))
        self.events.append({"step": self._step, "event": "oom", "error": str(exc)[:200],
                            "old_budget": self.work_budget, "new_budget": new})
        self.work_budget = new
        self._cache.clear()
        self.policy = None
        if self.profile is not None:
            try:
                self._regenerate(self.profile)
            except BudgetError:
                self.policy = None  # reactive rule only until the next detailed step

    def copy_Bps(self) -> float | None:
        """The copy lanes' bandwidth now (harmonic mean of device->host and back), as the
        meter learnt it from the start-up calibration and every copy since; None before
        both directions have a figure."""
        bw = self.executor.bw.Bps
        if not bw.get("out") or not bw.get("in"):
            return None
        return 2.0 / (1.0 / bw["out"] + 1.0 / bw["in"])

    # ---- reporting ---------------------------------------------------------------------
    @property
    def last(self) -> StepReport | None:
        return self.history[-1] if self.history else None

    def report(self) -> dict[str, Any]:
        """Summary for logs and benchmarks."""
        return {
            "budget": self.budget, "work_budget": self.work_budget, "steps": self._step,
            "detailed_steps": self.monitor.n_detailed_steps, "generation": self.generation,
            "ooms": self.ooms, "tier": self.executor.arena.tier,
            "lanes": self.executor.lanes.kind, "bw_out_Bps": self.executor.bw.get("out"),
            "bw_in_Bps": self.executor.bw.get("in"),
            "policy": self.policy.summary() if self.policy is not None else None,
            "last": self.last.stats.as_dict() if self.last is not None else None,
            "peak_resident": max((h.stats.peak_resident for h in self.history), default=0),
        }

    def close(self) -> None:
        self.tracker.remove()
        self.executor.close()


_MANAGERS: weakref.WeakKeyDictionary[nn.Module, SwapManager] = weakref.WeakKeyDictionary()


def swap(model: nn.Module, budget: int | str = "6GiB", **options: Any
         ) -> AbstractContextManager[SwapManager]:
    """`with chameleon.swap(model, budget="6GiB"):` around a training step. The manager
    (profile, policies, host arena) persists across steps on the model; options are
    `SwapConfig` fields."""
    cfg = SwapConfig(budget=budget, **options)
    mgr = _MANAGERS.get(model)
    if mgr is None or mgr.config != cfg:
        if mgr is not None:
            mgr.close()
        mgr = _MANAGERS[model] = SwapManager(model, cfg)
    return mgr.step_context()


def manager_for(model: nn.Module) -> SwapManager | None:
    """The manager `swap()` created for this model (for stats), if any."""
    return _MANAGERS.get(model)


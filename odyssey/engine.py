"""The engine: executes one rank's `Program` for one training step.

It runs exactly the instructions the simulator times, in order. Gradients are summed
over microbatches and divided by the global batch, so the update does not depend on how
microbatches are spread over pipelines. The optimizer step runs only after the commit
protocol says every member finished the step.

Between the gradient reduction and the optimizer step (`_commit`): fp16 gradients are
unscaled; each rank adds the squares of the gradients it counts (each layer by its first
holder, each tied group by the lowest rank holding a member) to its vote; the last voter
sums the votes and the decision carries the global norm and any overflow, so every rank
clips by the same factor, or skips the step, as one decision. The learning rate is set
from the step index right before the optimizer step (`odyssey.optim.lr_at`).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from chameleon import SwapConfig
from odyssey.comm import Comm, Pending, StepAborted
from odyssey.commit import COMMIT, CommitProtocol
from odyssey.data import Sampler
from odyssey.held_layers import HeldLayers
from odyssey.model import LayeredModel
from odyssey.online_profile import stage_timing
from odyssey.optim import (
    NoParamsOptimizer,
    OptimizerConfig,
    all_finite,
    clip_coefficient,
    lr_at,
    make_optimizer,
    sum_of_squares,
)
from odyssey.precision import LossScale, PrecisionConfig
from odyssey.stage_swap import StageSwap
from odyssey.step_result import OpTiming, StepResult, step_metrics
from planner.plan import Plan, runs_of
from planner.program import Instruction, Op, Program, compile_plan, tied_groups
from profiler.op_monitor import param_storages
from profiler.saved_bytes import SavedBytesMeter

__all__ = ["Engine", "NoParamsOptimizer", "OpTiming", "OptimizerConfig", "StepResult",
           "make_optimizer", "step_metrics"]


class Engine:
    """Holds one rank's layers and optimizers and executes its instructions.

    `before_op(step, op)` is called before each instruction (fault injection);
    `after_op(step, op, seconds)` after it, inside its timed interval (an injected
    slowdown, which the op's timing must include)."""

    def __init__(
        self,
        model: LayeredModel,
        data,
        sampler: Sampler,
        worker_id: int,
        optim: OptimizerConfig | None = None,
        device: torch.device | str = "cpu",
        before_op: Callable[[int, Op], None] | None = None,
        precision: PrecisionConfig | None = None,
        after_op: Callable[[int, Op, float], None] | None = None,
    ):
        self.model = model
        self.data = data
        self.sampler = sampler
        self.worker_id = worker_id
        self.optim_cfg = optim or OptimizerConfig()
        self.precision = precision or PrecisionConfig()
        self.device = torch.device(device)
        self.loss_scale = LossScale(self.precision)
        self.held = HeldLayers(model, self.device,
                               lambda layer, tied: make_optimizer(layer, self.optim_cfg, tied),
                               self.loss_scale)
        """This rank's layers with their optimizers: checkpoints and migration use it."""
        self.program: Program | None = None
        self.comm: Comm | None = None
        self.commit: CommitProtocol | None = None
        self._before_op = before_op
        self._after_op = after_op
        self._op_hooks: list[Callable[[OpTiming], None]] = []
        self._swap = StageSwap(self.device)
        self._meter = SavedBytesMeter()  # saved bytes per layer, while Chameleon is off
        self._committed_hook: Callable[[int, bool], None] | None = None

    # ---- configuration -------------------------------------------------------------
    def compile(self, plan: Plan) -> Program:
        """`plan` compiled for this engine's model (its tied groups included)."""
        return compile_plan(plan, tied=[g.layers for g in self.model.tied])

    def install(self, program: Program, comm: Comm, commit: CommitProtocol,
                keep: bool = False) -> None:
        """Adopt a program: build the layers this rank now holds.

        Layers no longer held are dropped now, or kept until `prune()` when `keep` is
        set (a transition that fails half-way must still find the old state intact).
        """
        self.program, self.comm, self.commit = program, comm, commit
        if not keep:
            self.prune()
        for i in self.stage_layers:
            if i not in self.held:
                self.held.reset(i)
        self._swap.install([self.held.module(i) for i in self.stage_layers])

    def enable_swap(self, cfg: SwapConfig) -> None:
        """Swap saved activations with Chameleon as `cfg` says (from the next `install`
        on; its `layers` become this rank's stage)."""
        self._swap.enable(cfg)

    def swap_to_fit(self, template: SwapConfig) -> None:
        """When a plan gives this rank a swap budget (`set_swap_budget`), run Chameleon
        with `template`'s settings and that budget."""
        self._swap.to_fit(template)

    def host_copy_Bps(self) -> float | None:
        """Copy bandwidth to host memory and back as Chameleon's lanes achieve it here
        with the `swap_to_fit` settings; None without them."""
        return self._swap.host_copy_Bps()

    def set_swap_budget(self, budget_bytes: float | None) -> None:
        """Saved-activation bytes this rank may keep resident under the plan `install`
        adopts next (None: the plan fits without swapping). With `swap_to_fit`, Chameleon
        turns on for that plan and off again for a later one that fits."""
        self._swap.set_budget(budget_bytes)

    def on_committed(self, hook: Callable[[int, bool], None] | None) -> None:
        """Call `hook(step, skipped)` once per committed step, after the commit decision
        and with the final gradients in place, just before the optimizer applies them
        (a two-phase background copy streams them); None removes it."""
        self._committed_hook = hook

    def lr_at(self, step: int) -> float:
        """The learning rate the optimizer step of `step` applies."""
        return lr_at(self.optim_cfg, step)

    def add_op_hook(self, hook: Callable[[OpTiming], None]) -> None:
        """Call `hook` after every instruction this rank executes (telemetry, profiling;
        with no hook the loop takes no extra timings)."""
        self._op_hooks.append(hook)

    def swap_report(self) -> dict | None:
        """Chameleon's report (None when swapping is off), and whether a plan's budget
        turned it on."""
        return self._swap.report()

    def prune(self) -> None:
        """Drop layers outside the current program's stage."""
        self.held.keep_only(self.stage_layers)

    @property
    def stage_layers(self) -> range:
        """Layers of this rank's stage in the installed program."""
        return self.program.plan.stage(self.worker_id).layers

    def warm_up(self) -> None:
        """One optimizer step on a throwaway copy of layer 0: the first step in a process
        pays seconds of lazy imports, which a joining rank pays before it announces."""
        layer = self.model.build_layer(0)
        opt = make_optimizer(layer, self.optim_cfg, self.model.tied_names(0))
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()

    def probe(self) -> float:
        """Seconds of one forward and backward of this rank's stage (the last installed
        program's) on one microbatch, the way training runs it: how fast a parked
        straggler computes now (odyssey/parked.py). Gradients are discarded and
        the random state is restored, so nothing the rank later trains with changes."""
        layers = self.stage_layers
        ids = self.sampler.sample_ids(0, 0)
        x, y = (t.to(self.device) for t in self.data.batch(ids))
        if layers.start > 0:
            x = self._empty_activation(layers.start).zero_().requires_grad_(True)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]), self.precision.autocast(self.device):
            h = x
            for i in layers:
                h = self.held.module(i)(h)
            out = (self.model.loss_fn(h, y).sum() if layers.stop == self.model.num_layers
                   else h.float().sum())
            out.backward()
        seconds = time.perf_counter() - t0
        self.zero_grad()
        return seconds

    # ---- execution -----------------------------------------------------------------
    def run_step(self, step: int) -> StepResult:
        """Execute this rank's program for `step`; raises `StepAborted` on abort."""
        assert self.program is not None and self.comm is not None and self.commit is not None
        t0 = time.perf_counter()
        st = _StepState(step)
        op_s = st.op_seconds
        if self._swap.on:
            swapping = self._swap.step_context()
        else:  # Chameleon's own hooks would hide the meter's: it measures only without
            modules = [self.held.module(i) for i in self.stage_layers]
            swapping = self._meter.step(set().union(*map(param_storages, modules)))
        try:
            with swapping:
                for ins in self.program.for_rank(self.worker_id):
                    if self._before_op is not None:
                        self._before_op(step, ins.op)
                    cpu = time.thread_time() if self._op_hooks else 0.0
                    t = time.perf_counter()
                    self._execute(ins, st)
                    if self._after_op is not None:
                        self._after_op(step, ins.op, time.perf_counter() - t)
                    end = time.perf_counter()
                    op_s[ins.op.value] += end - t
                    if self._op_hooks:
                        timing = OpTiming(step, ins, t, end, time.thread_time() - cpu)
                        for hook in self._op_hooks:
                            hook(timing)
        except BaseException:
            self.zero_grad()
            raise
        return StepResult(step, COMMIT, st.loss_sum, st.sample_ids, dict(op_s),
                          time.perf_counter() - t0, st.lr, st.grad_norm, st.skipped,
                          st.loss_scale)

    def _execute(self, ins: Instruction, st: _StepState) -> None:
        op = ins.op
        if op is Op.FORWARD:
            self._forward(ins, st)
        elif op is Op.BACKWARD:
            self._backward(ins, st)
        elif op is Op.SEND_ACT:
            st.pending.append(self.comm.send(st.outputs[ins.microbatch].detach(), ins.peer, "act"))
        elif op is Op.SEND_GRAD:
            st.pending.append(self.comm.send(st.input_grads.pop(ins.microbatch), ins.peer, "grad"))
        elif op is Op.RECV_ACT:  # the input of this rank's stage
            buf = self._empty_activation(self.program.plan.stage(self.worker_id).start)
            st.inputs[ins.microbatch] = self.comm.wait(self.comm.recv(buf, ins.peer, "act"))
        elif op is Op.RECV_GRAD:  # the gradient of this stage's output
            buf = self._empty_activation(self.program.plan.stage(self.worker_id).end)
            st.grads[ins.microbatch] = self.comm.wait(self.comm.recv(buf, ins.peer, "grad"))
        elif op is Op.ALLREDUCE:
            flat = self._flat_grads(self.held.untied_parameters(ins.start, ins.end))
            st.reductions.append((ins, self.comm.allreduce(flat, ins.group)))
        elif op is Op.ALLREDUCE_TIED:  # this rank's sum over its members, then over ranks
            local = torch.stack([g.reshape(-1) for g in self._grads(
                self.held.tied_members(ins.tied))]).sum(0)
            st.reductions.append((ins, self.comm.allreduce(local, ins.group)
                                  if len(ins.group) > 1 else local))
        elif op is Op.COMMIT:
            self._commit(st)
        elif op is Op.OPTIMIZER_STEP:
            st.lr = lr_at(self.optim_cfg, st.step)
            if self._committed_hook is not None:  # final gradients, before they are applied
                self._committed_hook(st.step, st.skipped)
            if not st.skipped:
                self.held.step(ins.start, ins.end, st.lr)
            self.zero_grad()
        else:  # pragma: no cover - Op is closed
            raise ValueError(f"unknown instruction {ins}")

    def _batch(self, st: _StepState, mb: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        if mb not in st.batches:
            ids = self.sampler.sample_ids(st.step, mb)
            x, y = self.data.batch(ids)
            st.batches[mb] = (ids, x.to(self.device), y.to(self.device))
        return st.batches[mb]

    def _forward(self, ins: Instruction, st: _StepState) -> None:
        mb = ins.microbatch
        if ins.start == 0:
            x = self._batch(st, mb)[1]
        else:
            x = st.inputs.pop(mb).requires_grad_(True)
        h = x
        last = self.model.num_layers - 1
        meter = self._meter
        meter.start()
        # each layer's forward wall time, for its share of the stage's time (the online
        # profile); on CPU only: on an accelerator it would time kernel launches
        clock = time.perf_counter if self.device.type == "cpu" else None
        t = clock() if clock else 0.0
        with self.precision.autocast(self.device):
            for i in range(ins.start, ins.end):
                h = self.held.module(i)(h)
                if i < last:
                    h = self.precision.boundary(h)
                    meter.mark(i)
                if clock and i < ins.end - 1:
                    now = clock()
                    st.layer_fwd_s[i] += now - t
                    t = now
            st.stage_inputs[mb] = x
            if ins.end == self.model.num_layers:
                ids, _, y = self._batch(st, mb)
                per_sample = self.model.loss_fn(h, y)
                meter.mark(last)  # the last layer's bytes include what the loss saves
            if clock:  # the stage's last layer, with the loss when it is the model's
                st.layer_fwd_s[ins.end - 1] += clock() - t
        if ins.end == self.model.num_layers:
            total = per_sample.sum()
            st.loss_sum += float(total.detach())
            st.sample_ids.extend(ids)
            loss = total / self.sampler.global_batch
            st.outputs[mb] = loss * self.loss_scale.scale if self.precision.scaled else loss
        else:
            st.outputs[mb] = h

    def _backward(self, ins: Instruction, st: _StepState) -> None:
        mb = ins.microbatch
        out = st.outputs.pop(mb)
        if ins.end == self.model.num_layers:
            out.backward()
        else:
            out.backward(st.grads.pop(mb))
        x = st.stage_inputs.pop(mb)
        if ins.start > 0:
            st.input_grads[mb] = x.grad
        st.batches.pop(mb, None)

    def _empty_activation(self, boundary: int) -> torch.Tensor:
        mb = self.sampler.microbatch_size
        spec = (self.model.boundary_spec(boundary, mb) if self.model.boundary_spec is not None
                else self.model.activation_spec(mb))
        dtype = self.precision.wire_dtype(spec.dtype)
        return torch.empty(spec.shape, dtype=dtype, device=self.device)

    @staticmethod
    def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def _flat_grads(self, params: list[nn.Parameter]) -> torch.Tensor:
        if not params:  # only parameterless layers (or tied parameters) in this range
            return torch.zeros(0, device=self.device)
        return torch.cat([g.reshape(-1) for g in self._grads(params)])

    def _commit(self, st: _StepState) -> None:
        for p in st.pending:
            self.comm.wait(p)
        for ins, p in st.reductions:
            flat = self.comm.wait(p) if isinstance(p, Pending) else p
            if ins.op is Op.ALLREDUCE_TIED:  # every member gets the group's sum
                for param in self.held.tied_members(ins.tied):
                    param.grad = flat.view_as(param).clone()
                continue
            offset = 0
            for param in self.held.untied_parameters(ins.start, ins.end):
                n = param.numel()
                param.grad = flat[offset:offset + n].view_as(param).clone()
                offset += n
        plan = self.program.plan
        stage = plan.stage(self.worker_id)
        grads = [p.grad for p in self.held.parameters(stage.start, stage.end)
                 if p.grad is not None]
        if self.precision.scaled:
            for g in grads:
                g.div_(self.loss_scale.scale)
        overflow = self.precision.scaled and not all_finite(grads)
        n_mb = sum(1 for i in self.program.for_rank(self.worker_id) if i.op is Op.FORWARD)
        params = [sum(p.numel() for p in self.held.module(i).parameters())
                  for i in stage.layers]
        payload = {"loss_sum": st.loss_sum, "samples": _ranges(st.sample_ids),
                   "timing": stage_timing(st.op_seconds, stage.start, stage.end, n_mb, params,
                                          None if self._swap.on
                                          else self._meter.per_microbatch(stage.layers),
                                          [st.layer_fwd_s.get(i, 0.0) for i in stage.layers]),
                   "sumsq": 0.0 if overflow else self._counted_sumsq(plan, stage.layers)}
        if overflow:
            payload["overflow"] = True
        if (swap := self._swap.vote()) is not None:  # resident vs budget, bandwidth
            payload["swap"] = swap
        need_totals = self.optim_cfg.grad_clip > 0 or self.precision.scaled
        decision, totals = self.commit.vote(self.worker_id, st.step, payload, need_totals)
        if decision != COMMIT:
            raise StepAborted(f"step {st.step} aborted by the commit protocol")
        st.loss_scale = self.loss_scale.scale
        if totals is None:
            return
        st.skipped = bool(totals["overflow"])
        self.loss_scale.update(st.skipped)
        if not st.skipped:
            st.grad_norm = totals["sumsq"] ** 0.5
            coef = clip_coefficient(st.grad_norm, self.optim_cfg.grad_clip)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)

    def _counted_sumsq(self, plan: Plan, layers: range) -> float:
        """Squared norm of the reduced gradients this rank counts: its layers' untied
        parameters where it is their first holder, and each tied group it is the lowest
        holder of (once, from one member)."""
        mine = [i for i in layers if plan.holders(i)[0] == self.worker_id]
        counted = [g for i in mine for g in self._grads(self.held.untied_parameters(i, i + 1))]
        for t, members in enumerate(tied_groups(plan, [g.layers for g in self.model.tied])):
            if members[0] == self.worker_id:
                counted.append(self._grads(self.held.tied_members(t))[0])
        return sum_of_squares(counted)

    def zero_grad(self) -> None:
        self.held.zero_grad()

    # ---- state of the whole stage ----------------------------------------------------
    def load_checkpoint(self, ckpt_dir: str | os.PathLike, step: int | None) -> None:
        """Load this rank's stage from the checkpoint of `step` (None: initial weights).

        The one reload path: a torchrun restart resuming and an in-place restart
        recovery both come here."""
        self.held.load_checkpoint(ckpt_dir, step, self.stage_layers)

    def layer_digests(self, only: set[int] | None = None) -> dict[int, str]:
        """Digest of each layer of this rank's stage (replica checks), or of those of
        them in `only`."""
        layers = self.stage_layers
        return self.held.digests(layers if only is None else [i for i in layers if i in only])


@dataclass
class _StepState:
    step: int
    batches: dict[int, tuple] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    stage_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    input_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    reductions: list[tuple[Instruction, Pending | torch.Tensor]] = field(default_factory=list)
    loss_sum: float = 0.0
    lr: float = 0.0
    grad_norm: float | None = None
    skipped: bool = False
    loss_scale: float = 1.0
    sample_ids: list[int] = field(default_factory=list)
    op_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    layer_fwd_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    """Forward wall seconds per layer (CPU only; empty elsewhere)."""


def _ranges(ids: list[int]) -> list[list[int]]:
    """Compress sample ids into [first, last] runs for compact votes and ledgers."""
    return [list(r) for r in runs_of(sorted(ids))]


def expand_ranges(runs: list[list[int]]) -> list[int]:
    return [s for a, b in runs for s in range(a, b + 1)]

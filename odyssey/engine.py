"""The engine: executes one rank's `Program` for one training step.

It runs exactly the instructions the simulator times, in order. Gradients are summed
over microbatches and divided by the global batch, so the update does not depend on how
microbatches are spread over pipelines. The optimizer step runs only after the commit
protocol says every member finished the step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from odyssey.comm import Comm, Pending, StepAborted
from odyssey.commit import COMMIT, CommitProtocol
from odyssey.data import Sampler
from odyssey.model import LayeredModel
from odyssey.online_profile import stage_timing
from planner.plan import runs_of
from planner.program import Instruction, Op, Program


@dataclass(frozen=True)
class OptimizerConfig:
    """Per-layer AdamW settings."""

    lr: float = 3e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""


class NoParamsOptimizer:
    """The optimizer of a layer without parameters (an activation, a reshape): a no-op
    with an empty state, so such layers checkpoint and migrate like any other."""

    def __init__(self) -> None:
        self.state: dict = {}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_optimizer(layer: nn.Module, cfg: OptimizerConfig
                   ) -> torch.optim.Optimizer | NoParamsOptimizer:
    params = list(layer.parameters())
    if not params:
        return NoParamsOptimizer()
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)


@dataclass
class StepResult:
    """What one rank observed while executing one step."""

    step: int
    decision: str
    loss_sum: float = 0.0
    """Sum of per-sample losses this rank computed (last stages only)."""
    sample_ids: list[int] = field(default_factory=list)
    """Sample ids whose loss this rank computed."""
    op_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time spent per op kind (for calibration)."""
    seconds: float = 0.0


class Engine:
    """Holds one rank's layers and optimizers and executes its instructions."""

    def __init__(
        self,
        model: LayeredModel,
        data,
        sampler: Sampler,
        worker_id: int,
        optim: OptimizerConfig | None = None,
        device: torch.device | str = "cpu",
    ):
        self.model = model
        self.data = data
        self.sampler = sampler
        self.worker_id = worker_id
        self.optim_cfg = optim or OptimizerConfig()
        self.device = torch.device(device)
        self.layers: dict[int, nn.Module] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.program: Program | None = None
        self.comm: Comm | None = None
        self.commit: CommitProtocol | None = None
        self.before_op: Callable[[int, Op], None] | None = None
        """Called before each instruction (fault injection, tracing)."""
        self.swap_options: dict | None = None
        """Chameleon SwapConfig fields when activation swapping is on (None: off)."""
        self.swap = None
        self._stage_module: nn.ModuleList | None = None

    # ---- configuration -------------------------------------------------------------
    def install(self, program: Program, comm: Comm, commit: CommitProtocol,
                keep: bool = False) -> None:
        """Adopt a program: build the layers this rank now holds.

        Layers no longer held are dropped now, or kept until `prune()` when `keep` is
        set (a transition that fails half-way must still find the old state intact).
        """
        self.program, self.comm, self.commit = program, comm, commit
        stage = program.plan.stage(self.worker_id)
        if not keep:
            self.prune()
        for i in stage.layers:
            if i not in self.layers:
                self.reset_layer(i)
        self._setup_swap(stage.layers)

    def _setup_swap(self, held: range) -> None:
        """(Re)create Chameleon's manager over this rank's stage (its layers changed)."""
        if self.swap_options is None:
            return
        from chameleon import SwapConfig, SwapManager  # optional: only when swapping

        if self.swap is not None:
            self.swap.close()
        layers = [self.layers[i] for i in held]
        self._stage_module = nn.ModuleList(layers)
        self.swap = SwapManager(self._stage_module,
                                SwapConfig(layers=layers, **self.swap_options), self.device)

    def prune(self) -> None:
        """Drop layers outside the current program's stage."""
        stage = self.program.plan.stage(self.worker_id)
        for i in [i for i in self.layers if i not in stage.layers]:
            del self.layers[i], self.optimizers[i]

    def reset_layer(self, i: int) -> None:
        """(Re)build layer i with its initial weights and a fresh optimizer."""
        self.layers[i] = self.model.build_layer(i).to(self.device)
        self.optimizers[i] = make_optimizer(self.layers[i], self.optim_cfg)

    @property
    def held_layers(self) -> list[int]:
        return sorted(self.layers)

    # ---- execution -----------------------------------------------------------------
    def run_step(self, step: int) -> StepResult:
        """Execute this rank's program for `step`; raises `StepAborted` on abort."""
        assert self.program is not None and self.comm is not None and self.commit is not None
        t0 = time.perf_counter()
        st = _StepState(step)
        op_s = st.op_seconds
        swapping = self.swap.step_context() if self.swap is not None else nullcontext()
        try:
            with swapping:
                for ins in self.program.for_rank(self.worker_id):
                    if self.before_op is not None:
                        self.before_op(step, ins.op)
                    t = time.perf_counter()
                    self._execute(ins, st)
                    op_s[ins.op.value] += time.perf_counter() - t
        except BaseException:
            self.zero_grad()
            raise
        return StepResult(step, COMMIT, st.loss_sum, st.sample_ids, dict(op_s),
                          time.perf_counter() - t0)

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
            flat = self._flat_grads(ins.start, ins.end)
            st.reductions.append((ins, self.comm.allreduce(flat, ins.group)))
        elif op is Op.COMMIT:
            self._commit(st)
        elif op is Op.OPTIMIZER_STEP:
            for i in range(ins.start, ins.end):
                self.optimizers[i].step()
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
        for i in range(ins.start, ins.end):
            h = self.layers[i](h)
        st.stage_inputs[mb] = x
        if ins.end == self.model.num_layers:
            ids, _, y = self._batch(st, mb)
            per_sample = self.model.loss_fn(h, y)
            total = per_sample.sum()
            st.loss_sum += float(total.detach())
            st.sample_ids.extend(ids)
            st.outputs[mb] = total / self.sampler.global_batch
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
        return torch.empty(spec.shape, dtype=spec.dtype, device=self.device)

    def _params(self, start: int, end: int) -> list[torch.nn.Parameter]:
        return [p for i in range(start, end) for p in self.layers[i].parameters()]

    def _flat_grads(self, start: int, end: int) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for p in self._params(start, end)]
        if not grads:  # only parameterless layers in this range
            return torch.zeros(0)
        return torch.cat([g.reshape(-1) for g in grads])

    def _commit(self, st: _StepState) -> None:
        for p in st.pending:
            self.comm.wait(p)
        for ins, p in st.reductions:
            flat = self.comm.wait(p)
            offset = 0
            for param in self._params(ins.start, ins.end):
                n = param.numel()
                param.grad = flat[offset:offset + n].view_as(param).clone()
                offset += n
        stage = self.program.plan.stage(self.worker_id)
        n_mb = sum(1 for i in self.program.for_rank(self.worker_id) if i.op is Op.FORWARD)
        params = [sum(p.numel() for p in self.layers[i].parameters()) for i in stage.layers]
        payload = {"loss_sum": st.loss_sum, "samples": _ranges(st.sample_ids),
                   "timing": stage_timing(st.op_seconds, stage.start, stage.end, n_mb, params)}
        decision = self.commit.vote(self.worker_id, st.step, payload)
        if decision != COMMIT:
            raise StepAborted(f"step {st.step} aborted by the commit protocol")

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    # ---- state ---------------------------------------------------------------------
    def layer_state(self, i: int) -> dict:
        return {"model": self.layers[i].state_dict(), "optim": self.optimizers[i].state_dict()}

    def load_layer_state(self, i: int, state: dict) -> None:
        self.layers[i].load_state_dict(state["model"])
        self.optimizers[i].load_state_dict(state["optim"])


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
    reductions: list[tuple[Instruction, Pending]] = field(default_factory=list)
    loss_sum: float = 0.0
    sample_ids: list[int] = field(default_factory=list)
    op_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _ranges(ids: list[int]) -> list[list[int]]:
    """Compress sample ids into [first, last] runs for compact votes and ledgers."""
    return [list(r) for r in runs_of(sorted(ids))]


def expand_ranges(runs: list[list[int]]) -> list[int]:
    return [s for a, b in runs for s in range(a, b + 1)]

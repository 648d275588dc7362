"""Validation loss on the held-out split, computed by every pipeline of the current plan.

Evaluation `j` (of `eval.microbatches`) reads validation samples j*mb .. (j+1)*mb - 1 (the
same samples every time) and runs forward only, without gradients, through pipeline
j mod P of the plan's pipelines that train microbatches; each rank handles its share in
increasing j (so pipelined sends and receives cannot deadlock), over the generation's
own activation channels, in the training compute dtype.

It must not disturb training: no gradient, no optimizer or loss-scale state, layers put
back in the train/eval mode they had, and the global RNG state restored. A failure during
an evaluation aborts it on every rank, as a step is aborted: each rank votes its loss sum
in a commit protocol of its own (`contract.EVAL_STORE_PREFIX`), so either every member
finished it or none did; the trainer recovers and redoes it under the new plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from odyssey import contract
from odyssey.comm import Pending, StepAborted
from odyssey.commit import COMMIT, CommitProtocol
from odyssey.engine import Engine
from odyssey.hooks import EvalResult
from odyssey.job_config import EvalConfig
from planner.plan import Plan


class Evaluator:
    """Runs evaluations for one rank; `run` is collective over the generation."""

    def __init__(self, data, cfg: EvalConfig, microbatch_size: int, steps: int):
        self.data = data
        self.cfg = cfg
        self.microbatch_size = microbatch_size
        self.steps = steps

    def due(self, step: int) -> bool:
        """Whether an evaluation follows the commit of `step` (every N-th, and the last)."""
        every = self.cfg.every
        return every > 0 and ((step + 1) % every == 0 or step == self.steps - 1)

    def sample_ids(self, j: int) -> list[int]:
        base = j * self.microbatch_size
        return list(range(base, base + self.microbatch_size))

    def run(self, step: int, engine: Engine, generation: int, rank: int,
            before: Callable[[int], None] | None = None) -> EvalResult:
        """Evaluate after `step`; every member returns the same loss. Raises
        `StepAborted`/`CommError` when a member fails (nothing was changed)."""
        t0 = time.perf_counter()
        if before is not None:
            before(step)  # fault injection (phase=eval)
        loss_sum, samples, pending = self._forward_share(engine, rank)
        for p in pending:
            engine.comm.wait(p)
        protocol = eval_protocol(engine.commit)
        decision, _ = protocol.vote(rank, step, {"loss_sum": loss_sum, "samples": samples})
        if decision != COMMIT:
            raise StepAborted(f"evaluation after step {step} aborted")
        votes = protocol.votes(step).values()
        total = sum(v["samples"] for v in votes)
        loss = sum(v["loss_sum"] for v in votes) / max(total, 1)
        return EvalResult(step, generation, rank, loss, total, time.perf_counter() - t0)

    def _forward_share(self, engine: Engine, rank: int) -> tuple[float, int, list[Pending]]:
        plan: Plan = engine.program.plan
        model = engine.model
        last = model.num_layers - 1
        pipelines = [p for p in plan.pipelines if p.microbatches]
        loss_sum, samples, pending = 0.0, 0, []
        modules = [engine.held.module(i) for i in engine.stage_layers]
        modes = [m.training for m in modules]
        precision = engine.precision
        devices = [engine.device] if engine.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in modules:
                m.eval()
            try:
                for j in range(self.cfg.microbatches):
                    pipe = pipelines[j % len(pipelines)]
                    if rank not in pipe.ranks:
                        continue
                    si = pipe.ranks.index(rank)
                    stage = pipe.stages[si]
                    ids = self.sample_ids(j)
                    if stage.start == 0:
                        h = self.data.batch(ids)[0].to(engine.device)
                    else:
                        buf = self._buffer(engine, stage.start)
                        h = engine.comm.wait(engine.comm.recv(buf, pipe.stages[si - 1].rank,
                                                              "act"))
                    with precision.autocast(engine.device):
                        for i in stage.layers:
                            h = engine.held.module(i)(h)
                            if i < last:
                                h = precision.boundary(h)
                        if stage.end == model.num_layers:
                            y = self.data.batch(ids)[1].to(engine.device)
                            loss_sum += float(model.loss_fn(h, y).float().sum())
                            samples += len(ids)
                    if stage.end < model.num_layers:
                        out = h.to(self._buffer(engine, stage.end).dtype).contiguous()
                        pending.append(engine.comm.send(out, pipe.stages[si + 1].rank, "act"))
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
        return loss_sum, samples, pending

    def _buffer(self, engine: Engine, boundary: int) -> torch.Tensor:
        model, mb = engine.model, self.microbatch_size
        spec = (model.boundary_spec(boundary, mb) if model.boundary_spec is not None
                else model.activation_spec(mb))
        dtype = engine.precision.wire_dtype(spec.dtype)
        return torch.empty(spec.shape, dtype=dtype, device=engine.device)


def eval_protocol(commit: CommitProtocol) -> CommitProtocol:
    """The commit protocol of evaluations, beside that of the steps of one generation."""
    return CommitProtocol(dist.PrefixStore(contract.EVAL_STORE_PREFIX, commit.store),
                          commit.generation, commit.members, abort_check=commit.abort_check)

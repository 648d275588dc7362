"""The training recipe's parts, without ranks: LR schedules, weight-decay groups, the
fp16 loss scale, tied groups in the model contract and the compiler, the commit totals,
and the state a layer carries when it migrates."""

from __future__ import annotations

import math
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from examples.gpt import GPTConfig
from odyssey.commit import COMMIT, CommitProtocol
from odyssey.data import ArithmeticTokens, Sampler
from odyssey.engine import Engine
from odyssey.held_layers import HeldLayers
from odyssey.job_config import job_config
from odyssey.model import TiedGroup
from odyssey.optim import OptimizerConfig, clip_coefficient, decays, lr_at, make_optimizer
from odyssey.precision import LossScale, PrecisionConfig
from planner.cost import CostModel
from planner.lowering import lower_program
from planner.plan import Plan
from planner.program import Op, compile_plan
from profiler import emulated_profile, loopback_comm
from tests.workers.train_tied_gpt import build_tied_gpt

TINY = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=2)


def test_lr_schedules_are_functions_of_the_step():
    cos = OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=4, decay_steps=10,
                          min_lr_ratio=0.1)
    assert [lr_at(cos, k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cos, 4) == 1.0 and lr_at(cos, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cos, 14) == pytest.approx(0.1) and lr_at(cos, 100) == pytest.approx(0.1)
    lin = OptimizerConfig(lr=2.0, schedule="linear", decay_steps=4)
    assert [lr_at(lin, k) for k in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert {lr_at(OptimizerConfig(lr=0.5), k) for k in range(50)} == {0.5}
    # decay_steps 0: until the end of training
    assert OptimizerConfig(schedule="cosine", warmup_steps=5).resolved(30).decay_steps == 25
    assert OptimizerConfig(warmup_steps=5).resolved(30).decay_steps == 0


@pytest.mark.parametrize("bad, match", [
    ({"schedule": "step"}, "schedule"), ({"betas": (0.9, 1.0)}, "betas"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"no_decay": "("}, "regex"), ({"warmup_steps": -1}, "warmup")])
def test_optimizer_config_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**bad)


def test_precision_config_is_checked_and_flags_exist():
    with pytest.raises(ValueError, match="precision.dtype"):
        PrecisionConfig(dtype="fp8")
    cfg = job_config(precision="bf16", grad_clip=1.0, warmup_steps=3, lr_schedule="cosine",
                     weight_decay=0.1, min_lr_ratio=0.1)
    assert cfg.precision.compute_dtype == torch.bfloat16
    assert (cfg.optimizer.grad_clip, cfg.optimizer.schedule) == (1.0, "cosine")


def test_default_decay_groups_leave_out_norms_biases_embeddings_and_tied_weights():
    model = build_tied_gpt(TINY)
    cfg = OptimizerConfig(weight_decay=0.1)
    emb, block, head = (model.build_layer(i) for i in (0, 1, model.num_layers - 1))
    tied_head = model.tied_names(model.num_layers - 1)
    assert tied_head == {"lm.weight": "embedding"}
    assert not decays(emb, "tok.weight", cfg) and not decays(emb, "pos.weight", cfg)
    assert {n for n, _ in block.named_parameters() if decays(block, n, cfg)} == {
        "qkv.weight", "proj.weight", "fc.weight", "out.weight"}
    assert not decays(head, "ln.weight", cfg) and not decays(head, "ln.bias", cfg)
    assert decays(head, "lm.weight", cfg)  # untied, a Linear decays
    assert not decays(head, "lm.weight", cfg, tied_head)  # tied: as the embedding
    opt = make_optimizer(block, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # a name rule overrides the default, tied groups matched by their name too
    rule = OptimizerConfig(weight_decay=0.1, no_decay=r"^ln|bias")
    assert decays(emb, "tok.weight", rule) and not decays(block, "ln1.weight", rule)
    assert decays(head, "lm.weight", rule, tied_head)
    assert not decays(head, "lm.weight", OptimizerConfig(no_decay="embed"), tied_head)


def test_loss_scale_backs_off_on_overflow_and_grows_after_clean_steps():
    s = LossScale(PrecisionConfig(dtype="fp16", init_scale=1024.0, growth_interval=2))
    s.update(True)
    assert s.scale == 512.0
    s.update(False)
    assert s.scale == 512.0
    s.update(False)
    assert (s.scale, s.clean_steps) == (1024.0, 0)
    bf16 = LossScale(PrecisionConfig(dtype="bf16"))
    bf16.update(True)
    assert bf16.scale == 1.0
    assert clip_coefficient(2.0, 1.0) == pytest.approx(0.5) and clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(10.0, 0.0) == 1.0


def test_tied_group_contract_is_checked():
    model = build_tied_gpt(TINY)
    with pytest.raises(ValueError, match="distinct"):
        type(model)(**{**model.__dict__, "tied": (TiedGroup("x", ((0, "tok.weight"),)),)})
    with pytest.raises(ValueError, match="outside"):
        type(model)(**{**model.__dict__, "tied": (TiedGroup("x", ((0, "a"), (9, "b"))),)})
    # build_layer gives the members equal initial values
    head = model.build_layer(model.num_layers - 1)
    assert torch.equal(head.lm.weight, model.build_layer(0).tok.weight)


def test_compiler_emits_one_tied_allreduce_over_every_member_holder():
    plan = Plan.uniform(4, 2, 2, 4, 2, "1f1b")  # ranks 0,2: layers 0-1; ranks 1,3: 2-3
    program = compile_plan(plan, tied=[(0, 3)])
    for r in range(4):
        tied = [i for i in program.for_rank(r) if i.op is Op.ALLREDUCE_TIED]
        assert len(tied) == 1 and tied[0].group == (0, 1, 2, 3) and tied[0].tied == 0
        ops = [i.op for i in program.for_rank(r)]
        assert ops.index(Op.ALLREDUCE_TIED) < ops.index(Op.COMMIT)  # after the layers'
    assert (0, 1, 2, 3) in program.allreduce_groups()
    # a lone holder of every member sums locally: the op is there, no group is
    lone = compile_plan(Plan.uniform(4, 1, 1, 4, 2, "1f1b"), tied=[(0, 3)])
    assert [i.group for i in lone.for_rank(0) if i.op is Op.ALLREDUCE_TIED] == [(0,)]
    assert lone.allreduce_groups() == []
    # and the simulator prices it like any all-reduce
    prof = emulated_profile(type("E", (), {"num_layers": 4, "forward_ms": 1.0,
                                           "backward_ms": 2.0, "dim": 16})(),
                            comm=loopback_comm(0.0, 1e30, 0.0))
    lowered, _, _ = lower_program(program, CostModel(prof))
    assert all(any(s[4].op is Op.ALLREDUCE_TIED for s in steps if hasattr(s[4], "op"))
               for steps in lowered.values())


def test_a_migrated_layer_carries_the_loss_scale():
    model = build_tied_gpt(TINY)
    src_scale = LossScale(PrecisionConfig(dtype="fp16", init_scale=8.0))
    src_scale.update(True)
    factory = lambda layer, tied: make_optimizer(layer, OptimizerConfig(), tied)  # noqa: E731
    src = HeldLayers(model, torch.device("cpu"), factory, src_scale)
    dst_scale = LossScale(PrecisionConfig(dtype="fp16", init_scale=8.0))
    dst = HeldLayers(model, torch.device("cpu"), factory, dst_scale)
    src.reset(1)
    dst.reset(1)
    dst.unpack(1, src.pack(1, torch.device("cpu")))
    assert dst_scale.state == src_scale.state == [4.0, 0.0]
    assert src.state_dict(1)["loss_scale"] == [4.0, 0.0]


def test_boundary_buffers_travel_in_the_compute_dtype():
    model = build_tied_gpt(TINY)
    data = ArithmeticTokens(TINY.vocab_size, TINY.seq_len)
    for dtype, expect in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                          ("fp16", torch.float16)):
        eng = Engine(model, data, Sampler(4, 2), 0, precision=PrecisionConfig(dtype=dtype))
        buf = eng._empty_activation(1)
        assert buf.dtype == expect and buf.shape == (2, TINY.seq_len, TINY.d_model)


def test_commit_decision_carries_the_summed_totals():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=30), use_libuv=True)
    out: dict[int, tuple] = {}

    def vote(w: int, sumsq: float, overflow: bool) -> None:
        store = dist.TCPStore("127.0.0.1", master.port, is_master=False,
                              timeout=timedelta(seconds=30), use_libuv=True)
        commit = CommitProtocol(store, 0, [0, 1])
        payload = {"sumsq": sumsq, **({"overflow": True} if overflow else {})}
        out[w] = commit.vote(w, 3, payload, totals=True)

    threads = [threading.Thread(target=vote, args=(0, 1.5, False)),
               threading.Thread(target=vote, args=(1, 2.5, True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out[0] == out[1] == (COMMIT, {"sumsq": 4.0, "overflow": True})
    assert math.isclose(out[0][1]["sumsq"] ** 0.5, 2.0)

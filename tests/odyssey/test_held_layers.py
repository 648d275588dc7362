"""The engine's state API (HeldLayers) and the typed recovery decision, without processes."""

import json

import pytest
import torch
from torch import nn

from odyssey.checkpoint import Checkpointer
from odyssey.emulate import EmulationConfig, build_emulated
from odyssey.engine import OptimizerConfig, make_optimizer
from odyssey.held_layers import HeldLayers
from odyssey.migrate import transport_device
from odyssey.model import LayeredModel, TensorSpec
from planner import Plan
from planner.decision import RecoveryDecision
from planner.recovery import RecoveryCandidate, Transfer

CPU = torch.device("cpu")


def held(model: LayeredModel, layers, device: torch.device = CPU) -> HeldLayers:
    h = HeldLayers(model, device,
                   lambda layer, tied: make_optimizer(layer, OptimizerConfig(), tied))
    for i in layers:
        h.reset(i)
    return h


def train_a_step(h: HeldLayers, start: int, end: int, seed: int = 0) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)).to(h.device)
    for i in range(start, end):
        x = h.module(i)(x)
    x.square().sum().backward()
    h.step(start, end)
    h.zero_grad()


def test_packed_layer_arrives_with_its_optimizer_state():
    model = build_emulated(EmulationConfig(num_layers=3, forward_ms=0, backward_ms=0))
    src, dst = held(model, range(3)), held(model, [1])
    for k in range(2):
        train_a_step(src, 0, 3, seed=k)
    assert src.digests([1]) != dst.digests([1])
    wire = transport_device("gloo", CPU)
    buf = dst.receive_buffer(1, wire)
    buf.copy_(src.pack(1, wire))
    dst.unpack(1, buf)
    assert src.digests([1]) == dst.digests([1])
    a, b = src.state_dict(1)["optim"]["state"], dst.state_dict(1)["optim"]["state"]
    assert a.keys() == b.keys() and all(
        torch.equal(a[k][n], b[k][n]) for k in a for n in ("step", "exp_avg", "exp_avg_sq"))
    # the next update is the same on both: the moments and step came along
    x = torch.randn(4, 16)
    for h in (src, dst):
        h.module(1)(x).square().sum().backward()
        h.step(1, 2)
    assert src.digests([1]) == dst.digests([1])


def test_parameterless_layer_packs_and_unpacks():
    model = LayeredModel("gelu", 1, lambda i: nn.GELU(), lambda out, y: out.sum(1),
                         lambda mb: TensorSpec((mb, 4)))
    src, dst = held(model, [0]), held(model, [0])
    wire = transport_device("gloo", CPU)
    flat = src.pack(0, wire)
    assert flat.shape == dst.receive_buffer(0, wire).shape == (2,)
    dst.unpack(0, flat)
    assert dst.digests([0]) == src.digests([0])


def test_transport_device_follows_the_backend():
    gpu = torch.device("cuda", 0)
    assert transport_device("gloo", gpu) == CPU
    assert transport_device("nccl", gpu) == gpu
    assert transport_device("gloo", CPU) == CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_is_packed_on_the_gpu_and_crosses_gloo_through_host_memory():
    gpu = torch.device("cuda", 0)
    model = build_emulated(EmulationConfig(num_layers=2, forward_ms=0, backward_ms=0))
    src, dst = held(model, range(2), gpu), held(model, [1], gpu)
    train_a_step(src, 0, 2)
    for backend, wire_type in (("nccl", "cuda"), ("gloo", "cpu")):
        wire = transport_device(backend, gpu)
        buf = dst.receive_buffer(1, wire)
        flat = src.pack(1, wire)
        assert flat.device.type == buf.device.type == wire_type
        buf.copy_(flat)
        dst.unpack(1, buf)
        assert src.digests([1]) == dst.digests([1])
        state = dst.optimizer(1).state
        assert all(v["exp_avg"].device == gpu for v in state.values()) and state


def test_checkpoint_load_and_reset(tmp_path):
    model = build_emulated(EmulationConfig(num_layers=2, forward_ms=0, backward_ms=0))
    h = held(model, range(2))
    initial = h.digests(range(2))
    train_a_step(h, 0, 2)
    trained = h.digests(range(2))
    saver = Checkpointer(tmp_path)
    saver.save(0, 0, {i: h.state_dict(i) for i in h.ids}, writers=[0],
               meta={"num_layers": 2, "next_step": 1})
    saver.flush()
    h.load_checkpoint(tmp_path, None, range(2))
    assert h.digests(range(2)) == initial
    h.load_checkpoint(tmp_path, 0, [1])
    assert h.digests(range(2)) == {0: initial[0], 1: trained[1]}
    h.keep_only([1])
    assert h.ids == [1] and 0 not in h and set(h.weights()) == {1}


def test_recovery_decision_round_trips_through_json():
    plan = Plan.uniform(4, 2, 2, 4, 2, "1f1b")
    cand = RecoveryCandidate("redundant", plan, [Transfer(2, 1, 0, 1024.0)], resume_step=5,
                             predicted_transition_s=0.1, predicted_step_s=0.2, score=3.0,
                             note="neighbour stages adopt the lost layers")
    d = RecoveryDecision(generation=1, chosen=cand, policy="adaptive", horizon_s=600.0,
                         members=[0, 1, 2], committed_step=4, agreed_at=1.5, decided_at=2.5,
                         candidates=[cand.row()], dropped={"reroute": "no peer"},
                         ranks_lost=[3], interrupted=1)
    back = RecoveryDecision.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back.to_dict() == d.to_dict()
    assert back.chosen.plan.to_dict() == plan.to_dict()
    assert back.chosen.transfers == cand.transfers and back.newcomers == []

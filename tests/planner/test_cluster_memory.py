"""The cluster simulator with a device memory: the live leader's candidates and drop
reasons, plans over budget counted, swap time charged, default results unchanged."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from launch.simulate import build_parser
from planner.cluster.policies import Costs, MemoryLimits, make_policy
from planner.cluster.predict import Predictor, layer_state_bytes
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig, simulate_trace
from planner.cluster.traces import TraceEvent, initial_nodes
from planner.cost import CostConfig, CostModel
from planner.memory import SwapPricing
from planner.plan import Plan
from planner.recovery import RecoveryConfig, RecoveryContext, build_candidates, score
from profiler.synthetic import emulated_profile

CLUSTER = ClusterConfig(num_nodes=2, gpus_per_node=4, trace_node_gpus=1)
# With 8 emulated layers (2 x 4 plan below, rank 1 lost): the plan peaks at 173 kB per
# rank, reroute too, reparallelize [4, 3] at 256 kB, redundant and the other fresh
# plans at 338-671 kB; static (non-activation) bytes are ~6 kB less than each peak.
ROOM = 300_000.0  # reroute and reparallelize [4, 3] fit, the rest do not
TIGHT = 254_000.0  # reparallelize [4, 3] fits only by swapping


@pytest.fixture(scope="module")
def cost() -> CostModel:
    cfg = SimpleNamespace(num_layers=8, forward_ms=10.0, backward_ms=20.0, dim=64)
    return CostModel(emulated_profile(cfg), CostConfig(ranks_per_node=4))


def plan8() -> Plan:
    return Plan.uniform(8, dp=2, pp=4, num_microbatches=8, microbatch_size=2)


def tc() -> TransitionConfig:  # no checkpoints: step counts are exact
    return TransitionConfig(detect_s=0.1, agree_s=0.2, plan_s=0.3, rebuild_s=0.4,
                            transfer_Bps=1e9, checkpoint_write_Bps=1e12,
                            checkpoint_load_Bps=1e6, checkpoint_interval_s=1e9,
                            control_plane="fixed")


def costs() -> Costs:
    return Costs(0.1, 0.2, 0.3, 0.4, 1e9, 30.0, 5.0, 1.0)


T_FAIL = 20.0
EVENTS = [*initial_nodes(8), TraceEvent(T_FAIL, "remove", "node1")]


def run(policy: str, cost: CostModel, duration: float = 60.0, **sim) -> object:
    return simulate_trace(policy, plan8(), cost, EVENTS, CLUSTER, tc(),
                          SimConfig(duration_s=duration, horizon_s=600.0, **sim))


def size(nbytes: float) -> str:
    return str(int(nbytes))  # bytes, as parse_size reads them


def test_the_simulator_drops_unfit_candidates_as_the_live_leader_does(cost):
    predict = Predictor(cost, "closed-form", 1.0)
    plan = plan8()
    members = [r for r in plan.ranks if r != 1]
    limits = SimConfig(device_memory=size(ROOM), memory_reserve="0").memory_limits()
    assert limits == MemoryLimits(ROOM, True, None)
    pol = make_policy("adaptive", cost, costs(), layer_state_bytes(cost), predict,
                      predict.by_length, 600.0, memory=limits)
    chosen, cands, rc, dropped = pol.decide(plan, members, 10, 5, "adaptive")
    # what odyssey/coordinator.py's _decide calls, with the same inputs
    ctx = RecoveryContext(plan, members, 10, layer_state_bytes(cost), 5, [])
    live, live_dropped = build_candidates(ctx, predict, predict_len=predict.by_length,
                                          memory=cost.memory, capacity_bytes=ROOM,
                                          drop_unfit=True, two_phase=True)
    score(live, ctx, rc, predict)
    assert [c.row() for c in cands] == [c.row() for c in live]
    assert dropped == live_dropped
    assert "redundant" in dropped and "> device memory" in dropped["redundant"]
    assert any(k.startswith("reparallelize [") for k in dropped)
    assert {c.kind for c in cands} == {"reroute", "reparallelize", "restart", "two-phase"}
    assert all(c.fits and c.peak_bytes <= ROOM for c in cands)
    assert chosen.fits and [len(p.stages) for p in chosen.plan.pipelines] == [4, 3]


def test_memory_unaware_runs_over_budget_are_counted(cost):
    unaware = run("adaptive", cost, device_memory=size(ROOM), memory_reserve="0",
                  memory_aware=False)
    aware = run("adaptive", cost, device_memory=size(ROOM), memory_reserve="0")
    assert aware.over_budget == 0 and aware.over_budget_gpu_h == 0.0
    assert aware.memory_dropped == 1 and unaware.memory_dropped == 0
    assert aware.peak_bytes <= ROOM
    # unaware picks the fastest fresh plan, [3, 2, 2] at 338 kB on 7 GPUs, and keeps it
    assert unaware.over_budget == 1 and unaware.peak_bytes > ROOM
    train_after = sum(s.t1 - s.t0 for s in unaware.segments
                      if s.what == "train" and s.t0 >= T_FAIL)
    assert train_after > 30.0
    assert unaware.over_budget_s == pytest.approx(train_after, rel=1e-9)
    assert unaware.over_budget_gpu_h == pytest.approx(train_after * 7 / 3600, rel=1e-9)
    assert any(n.startswith("ran over budget: would OOM (1 plans") for n in unaware.notes)
    assert unaware.samples > aware.samples  # the plan that would OOM looked faster


def test_swap_priced_runs_charge_swap_s_in_every_step_after(cost):
    sim = dict(device_memory=size(TIGHT), memory_reserve="0", swap=True,
               swap_host_Bps=2e4, swap_overlap=0.0)
    predict = Predictor(cost, "closed-form", 1.0)
    limits = SimConfig(**sim).memory_limits()
    assert limits.swap == SwapPricing(2e4, 0.0)
    pol = make_policy("reparallelize", cost, costs(), layer_state_bytes(cost), predict,
                      predict.by_length, 600.0, memory=limits)
    plan = plan8()
    chosen, *_ = pol.decide(plan, [r for r in plan.ranks if r != 1], 10, 5,
                            "reparallelize")
    assert chosen.kind == "reparallelize" and not chosen.fits and chosen.swap_budgets
    assert chosen.swap_s > 0.1
    before = run("reparallelize", cost, duration=T_FAIL, **sim)
    r = run("reparallelize", cost, **sim)
    assert r.swapping == 1 and r.over_budget == 0
    n = r.steps - before.steps  # steps of the swapping plan
    assert n > 0 and r.swap_time_s == pytest.approx(n * chosen.swap_s)
    step = predict(chosen.plan) + chosen.swap_s
    train_after = r.duration_s - T_FAIL - r.stall_s
    assert n * step <= train_after + 1e-9 < (n + 1) * step
    assert r.memory_dropped == 1 and r.memory_fallbacks == 0  # redundant was dropped
    # without swap the same policy cannot run its kind and falls back, for memory
    plain = run("reparallelize", cost, **{**sim, "swap": False})
    assert plain.swapping == 0 and plain.swap_time_s == 0.0
    assert plain.fallbacks == plain.memory_fallbacks == 1


def test_without_a_device_memory_results_are_unchanged(cost):
    def rows(r):
        d = r.row()
        d["notes"] = [n for n in d["notes"] if not n.startswith("simulated in")]
        return d, [asdict(s) for s in r.segments], r.events

    for policy in ("adaptive", "reroute", "redundant", "restart"):
        default = run(policy, cost)
        off = run(policy, cost, device_memory="off", memory_aware=False, swap=True,
                  swap_host_Bps=1.0, swap_overlap=0.0)
        assert rows(default) == rows(off)
        assert default.capacity_bytes == math.inf and default.peak_bytes == 0.0
        assert default.row()["capacity_bytes"] is None  # strict JSON: no infinity
        json.dumps(default.row(), allow_nan=False, default=str)
        assert default.over_budget == default.swapping == 0
    # and the policies decide exactly as without memory limits
    predict = Predictor(cost, "closed-form", 1.0)
    plan = plan8()
    members = [r for r in plan.ranks if r != 1]
    pol = make_policy("adaptive", cost, costs(), layer_state_bytes(cost), predict,
                      predict.by_length, 600.0, memory=SimConfig().memory_limits())
    _, cands, rc, dropped = pol.decide(plan, members, 10, 5, "adaptive")
    ctx = RecoveryContext(plan, members, 10, layer_state_bytes(cost), 5, [])
    plain, plain_dropped = build_candidates(ctx, predict, predict_len=predict.by_length,
                                            two_phase=True)
    score(plain, ctx, rc, predict)
    assert [c.row() for c in cands] == [c.row() for c in plain] and dropped == plain_dropped


def test_capacity_is_the_live_rule_and_flags_come_from_the_config():
    cfg = SimConfig(device_memory="80GiB")
    assert cfg.capacity_bytes() == RecoveryConfig().capacity_bytes(80 * 2**30) == 79 * 2**30
    assert SimConfig().capacity_bytes() == math.inf and SimConfig().memory_limits() is None
    with pytest.raises(ValueError, match="device_memory"):
        SimConfig(device_memory="lots")
    with pytest.raises(ValueError, match="swap_host_Bps"):
        SimConfig(swap_host_Bps=0.0)
    cmd = build_parser().parse_config(["--device-memory", "40GB", "--memory-reserve", "2GiB",
                                       "--no-memory-aware", "--swap", "--swap-host-Bps",
                                       "25e9", "--swap-overlap", "0.5"])
    assert (cmd.sim.device_memory, cmd.sim.memory_reserve, cmd.sim.memory_aware,
            cmd.sim.swap, cmd.sim.swap_host_Bps, cmd.sim.swap_overlap) == (
        "40GB", "2GiB", False, True, 25e9, 0.5)

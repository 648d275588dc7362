"""CostModel: instruction durations, link classes, memory, calibration."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from planner.calibrate import Calibration, CalibrationConfig
from planner.cost import CostConfig, CostModel
from planner.memory import MemoryConfig, inflight_microbatches
from planner.plan import Plan
from planner.program import Instruction, Op, compile_plan
from planner.simulate import simulate_plan
from profiler import FormulaConfig, LinkFit, emulated_profile, formula_profile, loopback_comm


def _emulated(**kw) -> CostModel:
    cfg = SimpleNamespace(num_layers=4, forward_ms=(1.0, 2.0, 3.0, 4.0), backward_ms=5.0, dim=8)
    return CostModel(emulated_profile(cfg, comm=loopback_comm(1e-4, 1e9, 2e-3)),
                     CostConfig(**kw))


def test_compute_ranges_and_constants():
    cost = _emulated()
    assert cost.forward_s(1, 3, 1) == pytest.approx(5e-3)
    assert cost.backward_s(0, 4, 7) == pytest.approx(20e-3)  # emulated: size-independent
    assert cost.commit_s() == pytest.approx(2e-3)
    assert cost.grad_bytes(0, 1) == cost.profile.layers[0].param_count * 4


def test_link_classes_and_comm_formulas():
    prof = formula_profile(FormulaConfig(preset="gpt3-125m"))
    cost = CostModel(prof, CostConfig(ranks_per_node=4))
    assert cost.link(0, 3) == "intra" and cost.link(3, 4) == "inter"
    assert cost.group_link([0, 1, 2]) == "intra" and cost.group_link([0, 5]) == "inter"
    intra, inter = prof.comm.p2p["intra"], prof.comm.p2p["inter"]
    assert cost.p2p_s(0, 1, 1e6) == pytest.approx(intra.alpha_s + 1e6 / intra.beta_Bps)
    assert cost.p2p_s(3, 4, 1e6) == pytest.approx(inter.alpha_s + 1e6 / inter.beta_Bps)
    fit = prof.comm.allreduce["inter"]
    n, nbytes = 8, 5e8
    expect = 2 * (n - 1) / n * nbytes / fit.beta_Bps + 2 * (n - 1) * fit.alpha_s
    assert cost.allreduce_s(list(range(0, 32, 4)), nbytes) == pytest.approx(expect)


def test_missing_inter_link_falls_back_to_intra():
    cost = _emulated(ranks_per_node=2)
    assert cost.p2p_s(1, 2, 1000) == cost.p2p_s(0, 1, 1000)


def test_instruction_durations_cover_every_instruction():
    cost = _emulated()
    plan = Plan.uniform(4, 2, 2, 4, 1)
    prog = compile_plan(plan)
    durs = cost.instruction_durations(prog)
    for r, instrs in prog.instructions.items():
        assert len(durs[r]) == len(instrs)
        for ins, d in zip(instrs, durs[r]):
            assert d >= 0
            if ins.op is Op.FORWARD:
                assert d == pytest.approx(cost.forward_s(ins.start, ins.end, 1))
            if ins.op is Op.SEND_ACT:  # output of layer 1 crosses the cut
                assert d == pytest.approx(cost.p2p_s(r, ins.peer, cost.boundary_bytes(1, 1)))
    with pytest.raises(ValueError, match="no stage boundary"):
        cost.instruction_s(Instruction(Op.SEND_ACT, 0, peer=3), 0, 1)


def test_static_memory_adamw_and_inflight():
    cost = _emulated(memory=MemoryConfig(reserve_bytes=100.0))
    st = cost.memory.static(0, 2)
    count = sum(lp.param_count for lp in cost.profile.layers[:2])
    assert st.params == count * 4 and st.grads == count * 4
    assert st.optimizer == count * 8  # two fp32 moments
    assert st.reserve == 100.0
    assert [inflight_microbatches("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [inflight_microbatches("1f1b", 4, s, 2) for s in range(4)] == [2, 2, 2, 1]
    assert inflight_microbatches("gpipe", 4, 3, 8) == 8


def test_calibration_tracks_constant_ratio_and_scales_predictions():
    cost = _emulated()
    before = cost.forward_s(0, 4, 1)
    for _ in range(20):
        cost.observe(Op.FORWARD, 1e-3, 1.5e-3)
    assert cost.factor("forward") == pytest.approx(1.5)
    assert cost.forward_s(0, 4, 1) == pytest.approx(1.5 * before)
    assert cost.factor(Op.SEND_ACT) == 1.0  # other kinds untouched
    rep = cost.calibration.report()["forward"]
    assert rep["accepted"] == 20 and rep["error"]["median"] == pytest.approx(0.0, abs=1e-9)


def test_calibration_rejects_outliers_but_follows_a_regime_change():
    cal = Calibration(CalibrationConfig(ewma_weight=0.2, window=16))
    for _ in range(10):
        cal.observe("p2p", 1.0, 1.0 + 0.01 * (_ % 3))
    assert not cal.observe("p2p", 1.0, 50.0)  # a hiccup
    assert cal.factor("p2p") == pytest.approx(1.01, abs=0.02)
    for _ in range(30):  # the machine really got 2x slower
        cal.observe("p2p", 1.0, 2.0)
    assert cal.factor("p2p") == pytest.approx(2.0, rel=0.05)
    assert cal.kinds["p2p"].rejected >= 1
    again = Calibration.from_dict(cal.to_dict())
    assert again.factor("p2p") == cal.factor("p2p")
    assert not cal.observe("forward", 0.0, 1.0) and not cal.observe("forward", 1.0, math.nan)
    with pytest.raises(ValueError, match="unknown op kind"):
        cal.observe("warp", 1.0, 1.0)


def test_calibrate_bulk_and_predict_entry_point():
    cost = _emulated()
    plan = Plan.uniform(4, 1, 2, 4, 1)
    base = simulate_plan(plan, cost).step_time_s
    cost.calibrate([(Op.BACKWARD, 1.0, 2.0)] * 5 + [(Op.FORWARD, 1.0, 2.0)] * 5)
    after = simulate_plan(plan, cost).step_time_s
    commit = cost.commit_s()
    assert after - commit == pytest.approx(2 * (base - commit), rel=0.02)


def test_linkfit_formulas():
    fit = LinkFit(1e-5, 1e9)
    assert fit.p2p_s(1e9) == pytest.approx(1 + 1e-5)
    assert fit.ring_allreduce_s(1e9, 1) == 0.0
    assert fit.ring_allreduce_s(1e9, 4) == pytest.approx(1.5 + 6e-5)

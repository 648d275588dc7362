"""Event simulator over Programs: closed forms, barriers, unequal pipelines, deadlocks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from planner.closed_form import estimate_plan, pipeline_s, ring_allreduce_s
from planner.cost import CostConfig, CostModel
from planner.lowering import COMPUTE, MACRO, RECV, SEND, lower_pipelines, lower_program
from planner.partition import split_microbatches
from planner.plan import Pipeline, Plan, Stage
from planner.program import Instruction, Op, compile_plan
from planner.reduce import _classes, layer_groups, reduce_plan
from planner.simulate import DeadlockError, SimulationError, simulate, simulate_plan
from profiler import emulated_profile, loopback_comm


def _cost(num_layers=8, fwd=1.0, bwd=2.0, comm=None, rpn=None, dim=16) -> CostModel:
    cfg = SimpleNamespace(num_layers=num_layers, forward_ms=fwd, backward_ms=bwd, dim=dim)
    prof = emulated_profile(cfg, comm=comm or loopback_comm(0.0, 1e30, 0.0))
    return CostModel(prof, CostConfig(ranks_per_node=rpn))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("pp,m", [(1, 1), (2, 3), (4, 8), (8, 5)])
def test_uniform_stages_match_closed_form_exactly(schedule, pp, m):
    cost = _cost()
    plan = Plan.uniform(8, 1, pp, m, 1, schedule=schedule)
    res = simulate(compile_plan(plan), cost)
    f, b = 8 / pp * 1e-3, 8 / pp * 2e-3
    expected = (m + pp - 1) * (f + b)
    assert res.step_time_s == pytest.approx(expected, rel=1e-12)
    assert pipeline_s(schedule, [f] * pp, [b] * pp, m) == pytest.approx(expected, rel=1e-12)
    assert estimate_plan(plan, cost).step_s == pytest.approx(expected, rel=1e-12)
    for br in res.ranks.values():  # the parts of every rank add up to the step
        assert br.total_s == pytest.approx(res.step_time_s, rel=1e-12)
        assert br.compute_s == pytest.approx(m * (f + b), rel=1e-12)


def test_closed_form_with_p2p_is_close_but_below():
    cost = _cost(comm=loopback_comm(2e-4, 1e9, 0.0))
    plan = Plan.uniform(8, 1, 4, 16, 1)
    sim = simulate(compile_plan(plan), cost).step_time_s
    est = estimate_plan(plan, cost).step_s
    assert est <= sim * (1 + 1e-12)
    assert est == pytest.approx(sim, rel=0.05)


def test_allreduce_waits_for_slowest_member():
    cost = _cost(num_layers=4, comm=loopback_comm(1e-3, 1e6, 0.0))
    # two single-stage replicas; pipeline 0 trains 3 microbatches, pipeline 1 only 1
    plan = Plan(4, 4, 1, [Pipeline([Stage(0, 0, 4)], [0, 1, 2]),
                          Pipeline([Stage(1, 0, 4)], [3])])
    res = simulate(compile_plan(plan), cost)
    per_mb = 4 * 3e-3
    ar = ring_allreduce_s(cost.grad_bytes(0, 4), 2, 1e-3, 1e6)
    assert res.ranks[0].end_s == pytest.approx(3 * per_mb + ar)
    assert res.ranks[1].end_s == pytest.approx(3 * per_mb + ar)  # ends together
    assert res.ranks[1].bubble_s == pytest.approx(2 * per_mb)  # waited for rank 0
    assert res.ranks[0].allreduce_s == res.ranks[1].allreduce_s == pytest.approx(ar)


def test_activation_memory_1f1b_vs_gpipe():
    cost = _cost()
    p, m = 4, 8
    # saved bytes of the stage + its output buffer; the last stage holds none (its
    # output feeds the loss)
    saved, out = cost.memory.activation_tables(1)
    per_mb = [cost.memory.microbatch_bytes(2 * s, 2 * s + 2, 1) for s in range(p)]
    assert per_mb == [saved[2 * s] + saved[2 * s + 1] + (out[2 * s + 1] if s < p - 1 else 0)
                      for s in range(p)] and out[7] == 0
    for schedule, inflight in (("1f1b", lambda s: p - s), ("gpipe", lambda s: m)):
        plan = Plan.uniform(8, 1, p, m, 1, schedule=schedule)
        res = simulate(compile_plan(plan), cost)
        for s in range(p):
            assert res.ranks[s].memory.activations == pytest.approx(inflight(s) * per_mb[s])
    from planner.memory import plan_memory

    formula = plan_memory(Plan.uniform(8, 1, p, m, 1, schedule="1f1b"), cost.memory)
    assert [formula[s].activations for s in range(p)] == [(p - s) * per_mb[s]
                                                          for s in range(p)]


def test_unequal_pipelines_two_stages_plus_one_with_2_to_1_split():
    cost = _cost(num_layers=4)  # 1 ms fwd, 2 ms bwd per layer
    fixed_a, per_a = 6e-3, 6e-3  # 2 stages of 2 layers: sum - max, max
    fixed_b, per_b = 0.0, 12e-3
    counts = split_microbatches(6, [per_a, per_b], [fixed_a, fixed_b])
    assert counts == [4, 2]
    plan = Plan(4, 6, 1, [Pipeline([Stage(0, 0, 2), Stage(1, 2, 4)], [0, 2, 3, 5]),
                          Pipeline([Stage(2, 0, 4)], [1, 4])])
    prog = compile_plan(plan)
    assert sum(i.op is Op.ALLREDUCE for i in prog.for_rank(2)) == 2  # two layer groups
    res = simulate(prog, cost)
    assert res.step_time_s == pytest.approx((4 + 2 - 1) * 6e-3)
    assert res.ranks[2].compute_s == pytest.approx(2 * 12e-3)
    assert simulate_plan(plan, cost).step_time_s == pytest.approx(res.step_time_s)


def test_deadlock_detected_and_located():
    plan = Plan.uniform(4, 1, 2, 2, 1)
    prog = compile_plan(plan)
    r0 = prog.instructions[0]
    i_send = next(i for i, x in enumerate(r0) if x.op is Op.SEND_ACT)
    i_recv = next(i for i, x in enumerate(r0) if x.op is Op.RECV_GRAD)
    r0.insert(i_send, r0.pop(i_recv))  # wait for a gradient before sending the activation
    with pytest.raises(DeadlockError) as ei:
        simulate(prog, _cost(num_layers=4))
    msg = str(ei.value)
    assert set(ei.value.blocked) == {0, 1}
    assert "rank 0: blocked at #1 recv_grad(mb=0, peer=1)" in msg
    assert "channel act-0-1 is empty" in msg and "sender rank 0 is blocked" in msg


def test_allreduce_order_mismatch_is_a_deadlock():
    plan = Plan.uniform(4, 2, 1, 2, 1)
    prog = compile_plan(plan)
    extra = Instruction(Op.ALLREDUCE, start=0, end=2, group=(0, 1))
    other = Instruction(Op.ALLREDUCE, start=2, end=4, group=(0, 1))
    for r, order in ((0, [extra, other]), (1, [other, extra])):
        ops = [i for i in prog.instructions[r] if i.op is not Op.ALLREDUCE]
        at = next(k for k, i in enumerate(ops) if i.op is Op.COMMIT)
        prog.instructions[r] = ops[:at] + order + ops[at:]
    with pytest.raises(DeadlockError, match=r"waits for \[1\] to reach it"):
        simulate(prog, _cost(num_layers=4))


def test_channel_order_mismatch_is_reported():
    prog = compile_plan(Plan.uniform(4, 1, 2, 2, 1, schedule="gpipe"))
    r1 = prog.instructions[1]
    recvs = [i for i, x in enumerate(r1) if x.op is Op.RECV_ACT]
    r1[recvs[0]], r1[recvs[1]] = r1[recvs[1]], r1[recvs[0]]
    with pytest.raises(SimulationError, match="delivers microbatch 0 first"):
        simulate(prog, _cost(num_layers=4))


def _random_plan(rng: random.Random, max_m: int = 90):
    layers = rng.randint(4, 10)
    comm = loopback_comm(rng.choice([0.0, 1e-4, 1e-3]), rng.choice([1e8, 1e9]), 1e-3)
    fwd = tuple(rng.uniform(1, 5) for _ in range(layers))
    bwd = tuple(rng.uniform(2, 10) for _ in range(layers))
    cost = _cost(layers, fwd, bwd, comm, rng.choice([None, 2, 3]), rng.choice([16, 4096]))
    dp, pp = rng.randint(1, 3), rng.randint(1, min(layers, 4))
    plan = Plan.uniform(layers, dp, pp, rng.randint(dp, max_m), 1,
                        schedule=rng.choice(["1f1b", "gpipe"]))
    if dp >= 2 and pp >= 2:  # make pipeline 0 a 2-stage one with a different cut
        p0 = plan.pipelines[0]
        half = rng.randint(1, layers - 1)
        plan.pipelines[0] = Pipeline([Stage(p0.stages[0].rank, 0, half),
                                      Stage(p0.stages[1].rank, half, layers)],
                                     p0.microbatches)
    return plan.validate(), cost


def test_reduced_and_extrapolated_simulation_equals_full(monkeypatch):
    import planner.reduce as reduce_mod

    used = []
    original = reduce_mod._extrapolated

    def spy(*args):
        out = original(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(reduce_mod, "_extrapolated", spy)
    rng = random.Random(7)
    for _ in range(25):
        plan, cost = _random_plan(rng, 400)
        full = simulate(compile_plan(plan), cost)
        fast = simulate_plan(plan, cost)
        assert fast.step_time_s == pytest.approx(full.step_time_s, rel=1e-9)
        for r, b in full.ranks.items():
            f = fast.ranks[r]
            for k in ("compute_s", "p2p_s", "bubble_s", "allreduce_s", "end_s"):
                assert getattr(f, k) == pytest.approx(getattr(b, k), rel=1e-9, abs=1e-12)
            assert f.memory == b.memory
    assert sum(used) >= 3  # the steady-state extrapolation was exercised


def _expand(steps):
    out = []
    for code, d, x, mb, _ in steps:
        if code == MACRO:
            rc, act, sc, sd = x
            if rc is not None:
                out.append((RECV, 0.0, rc[3], mb))
            out.append((COMPUTE, d, act, mb))
            if sc is not None:
                out.append((SEND, sd, sc[3], mb))
        elif code in (SEND, RECV):
            out.append((code, d, x[3], mb))
        else:
            out.append((code, d, x[:3] if isinstance(x, tuple) and len(x) == 4 else x, mb))
    return out


def test_direct_lowering_matches_compile_plan():
    """`lower_pipelines` mirrors `compile_plan`; this catches either one changing."""
    rng = random.Random(3)
    for _ in range(20):
        plan, cost = _random_plan(rng)
        classes, rep = _classes(plan, cost)
        if len(classes) != len(plan.pipelines):
            continue
        groups = sorted((g for g in layer_groups(plan) if len(g[1]) > 1),
                        key=lambda g: -g[0][0])
        direct, _, _ = lower_pipelines(plan, [(p, p.microbatches) for p in plan.pipelines],
                                    groups, rep, cost, {})
        generic, _, _ = lower_program(compile_plan(plan), cost)
        for r in generic:
            a, b = _expand(direct[r]), _expand(generic[r])
            assert [(c, x) for c, _, x, _ in a] == [(c, x) for c, _, x, _ in b]
            assert [d for _, d, _, _ in a] == pytest.approx([d for _, d, _, _ in b])


def test_reduced_program_simulates_like_the_plan():
    rng = random.Random(9)
    for _ in range(10):
        plan, cost = _random_plan(rng)
        red = reduce_plan(plan, cost)
        got = simulate(red.program, cost, red.overrides)
        want = simulate(compile_plan(plan), cost)
        assert got.step_time_s == pytest.approx(want.step_time_s, rel=1e-12)
        for r, rep in red.representative.items():
            assert got.ranks[rep].end_s == pytest.approx(want.ranks[r].end_s, rel=1e-12)


def test_layer_groups_fast_path_matches_plan():
    rng = random.Random(5)
    for _ in range(20):
        plan, _ = _random_plan(rng)
        assert layer_groups(plan) == plan.layer_groups()

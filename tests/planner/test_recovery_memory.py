"""Per-rank memory of recovery candidates, and dropping those over the device capacity."""

import math

import pytest

from odyssey.emulate import EmulationConfig
from planner import Plan
from planner.cost import CostModel
from planner.decision import RecoveryDecision
from planner.memory import (
    RankSteps,
    SwapPricing,
    peak_memory,
    plan_memory,
    swap_floor,
    swap_need,
)
from planner.placement import fresh_plan, fresh_plans
from planner.program import compute_orders
from planner.recovery import (
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
    choose,
    redundant,
    reroute,
    score,
)
from planner.simulate import simulate_plan
from planner.swap_policy import generate_policy, minimum_budget
from planner.swap_pricing import PRICING_POLICY, rank_step
from profiler.synthetic import emulated_profile

COST = CostModel(emulated_profile(EmulationConfig(num_layers=8, forward_ms=10,
                                                  backward_ms=20)))
MEM = COST.memory
PLAN = Plan.uniform(8, 2, 4, 8, 2)  # 2 pipelines x 4 stages of 2 layers, 1f1b


def predict(plan: Plan) -> float:
    return simulate_plan(plan, COST).step_time_s


def ctx(dead):
    return RecoveryContext(PLAN, [r for r in PLAN.ranks if r not in dead], 10,
                           [1e6] * 8, 7)


def test_plan_memory_adds_static_activations_in_flight_and_buffers():
    mem = plan_memory(PLAN, MEM)
    out = MEM.activation_tables(2)[1]
    for r in PLAN.ranks:
        st = PLAN.stage(r)
        s = PLAN.stage_of(r)[1]
        static = MEM.static(st.start, st.end)
        assert mem[r].params == static.params and mem[r].optimizer == static.optimizer
        assert mem[r].activations == (4 - s) * MEM.microbatch_bytes(st.start, st.end, 2)
        recv = (out[st.start - 1] if s > 0 else 0.0) + (out[st.end - 1] if s < 3 else 0.0)
        assert mem[r].comm == pytest.approx(recv + MEM.allreduce_bytes(st.start, st.end))
        assert mem[r].total == pytest.approx(static.total + mem[r].activations + mem[r].comm)
    pk = peak_memory(PLAN, MEM)
    assert pk.max_bytes == max(m.total for m in mem.values())
    assert pk.rank == min(r for r in mem if mem[r].total == pk.max_bytes)


def test_shared_and_adopted_stages_hold_more_and_bound_the_event_simulator():
    base = plan_memory(PLAN, MEM)
    rerouted = reroute(ctx([1])).plan  # rank 5 serves both pipelines' stage 1
    mem = plan_memory(rerouted, MEM)
    assert mem[5].activations == pytest.approx(2 * base[5].activations)
    assert mem[5].params == base[5].params  # its layers once
    adopted = redundant(ctx([1])).plan  # rank 0 adopts layers 2..3
    mem2 = plan_memory(adopted, MEM)
    assert mem2[0].params == pytest.approx(2 * base[0].params)
    assert mem2[0].total > base[0].total
    for plan, formula in ((rerouted, mem), (adopted, mem2)):  # the formula is an upper bound
        sim = simulate_plan(plan, COST)
        for r, m in formula.items():
            assert m.activations >= sim.ranks[r].memory.activations - 1e-9


def test_candidates_carry_their_peak_and_unfit_ones_are_dropped():
    c = ctx([1])
    cands, dropped = build_candidates(c, predict, memory=MEM)
    assert all(x.peak_bytes > 0 and x.fits and x.peak_rank >= 0 for x in cands)
    row = cands[0].row()
    assert {"peak_bytes", "peak_rank", "fits", "transfer_rounds"} <= set(row)
    least = {}
    for x in cands:
        least[x.kind] = min(least.get(x.kind, math.inf), x.peak_bytes)
    # a capacity below redundant compute's peak (rank 0 holds 4 layers), above reroute's
    # and the smallest fresh plan's
    low = max(least["reroute"], least["restart"])
    cap = (least["redundant"] + low) / 2
    assert low < cap < least["redundant"]
    kept, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=cap)
    assert {"reroute", "reparallelize", "restart"} <= {x.kind for x in kept}
    assert "redundant" not in {x.kind for x in kept}
    assert "device memory" in dropped["redundant"] and "rank 0" in dropped["redundant"]
    assert all(x.fits and x.peak_bytes <= cap for x in kept)
    # off: everything kept, the unfit one says so
    off, dropped_off = build_candidates(c, predict, memory=MEM, capacity_bytes=cap,
                                        drop_unfit=False)
    assert len(off) == len(cands) and "redundant" not in dropped_off
    assert [x.fits for x in off if x.kind == "redundant"] == [False]
    # nothing fits: all kept, and the decision tells it runs over budget
    tiny, dropped_tiny = build_candidates(c, predict, memory=MEM, capacity_bytes=1.0)
    assert len(tiny) == len(cands) and not any(x.fits for x in tiny)
    assert "no candidate fits" in dropped_tiny["memory"]


def test_partly_unfit_kind_is_named_by_its_shape():
    c = ctx([1])
    cands, _ = build_candidates(c, predict, memory=MEM)
    rep = sorted((x for x in cands if x.kind == "reparallelize"), key=lambda x: x.peak_bytes)
    cap = (rep[0].peak_bytes + rep[-1].peak_bytes) / 2
    kept, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=cap)
    assert any(x.kind == "reparallelize" for x in kept)
    assert any(k.startswith("reparallelize [") for k in dropped)


def test_decision_rows_roundtrip_with_memory():
    c = ctx([1])
    cfg = RecoveryConfig()
    cands, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=math.inf)
    score(cands, c, cfg, predict)
    chosen = choose(cands, cfg)
    d = RecoveryDecision(1, chosen, "adaptive", 600.0, c.members, 10, 0.0, 1.0,
                         [x.row() for x in cands], dropped)
    back = RecoveryDecision.from_dict(d.to_dict())
    assert back.chosen.peak_bytes == chosen.peak_bytes and back.chosen.fits
    assert [t.round for t in back.chosen.transfers] == [t.round for t in chosen.transfers]


def test_capacity_from_config():
    assert RecoveryConfig().capacity_bytes() == math.inf  # CPU: unchecked
    assert RecoveryConfig().capacity_bytes(80 * 2**30) == 79 * 2**30  # device - reserve
    assert RecoveryConfig(device_memory="16GiB").capacity_bytes(80 * 2**30) == 16 * 2**30
    assert RecoveryConfig(device_memory="off").capacity_bytes(80 * 2**30) == math.inf
    with pytest.raises(ValueError, match="device_memory 'lots'"):
        RecoveryConfig(device_memory="lots")


def test_leader_screen_above_exact_upto_builds_few_plans_and_skips_unfit_counts():
    c = ctx([1])  # 7 members: counts 1..7 are feasible
    assert len(fresh_plans(c, predict)) == 6  # exact: all 7 built, the 6 fastest kept
    assert len(fresh_plans(c, predict, exact_upto=4, screen=3)) == 3  # screened by predict
    cap = peak_memory(fresh_plan(c, [1] * 7), MEM).max_bytes - 1  # all 8 layers on a rank
    fits = lambda p: peak_memory(p, MEM).fits(cap)  # noqa: E731
    plans = fresh_plans(c, predict, exact_upto=4, screen=7, fits=fits)
    assert plans and all(fits(p) for p in plans)
    assert {len(p.pipelines) for p in plans} <= {1, 2, 3}  # 4+ pipelines: a 1-stage one


def test_swap_prices_a_plan_that_fits_only_by_swapping():
    adopted = redundant(ctx([1])).plan  # rank 0 holds layers 0..3 for 4 microbatches
    mem = plan_memory(adopted, MEM)[0]
    one_mb = MEM.saved_bytes(0, 4, 2)  # only what autograd saves can move
    saved = 3 * one_mb  # first of 3 stages under 1F1B: 3 microbatches in flight
    outs = mem.activations - saved  # their output buffers stay for the sends
    assert outs == pytest.approx(3 * MEM.activation_tables(2)[1][3])
    slow = SwapPricing(host_Bps=1e3, overlap=0.5)  # slow enough to show through compute
    floor = mem.static + outs + max(MEM.activation_tables(2)[0][0:4])  # one layer's stay
    assert swap_need(adopted, MEM, floor - 1, slow) is None  # cannot fit
    assert swap_need(adopted, MEM, floor, slow) is not None
    cap = mem.static + outs + saved / 2  # half the saved bytes resident
    need = swap_need(adopted, MEM, cap, slow)
    assert set(need.budgets) >= {0} and need.budgets[0] == pytest.approx(saved / 2)
    produced = 4 * one_mb  # rank 0 computes the pipeline's 4 microbatches
    # Chameleon's policy moves at least the excess out and back, at most all it produces
    assert 2 * (saved - need.budgets[0]) <= need.copied_bytes[0] <= 2 * produced
    compute = 4 * (4 * 10e-3 + 4 * 20e-3)
    # two copy lanes at 1 kB/s beside the compute: the stall is at least the rest
    assert need.exposed_s >= need.copied_bytes[0] / 2 / 1e3 - compute - 1e-12
    assert swap_need(adopted, MEM, cap, SwapPricing(host_Bps=1e12)).exposed_s < 1e-6
    # the price is the timeline Chameleon follows: its policy at that budget, simulated;
    # overlap 0.5 exposes half of the copy time it hid
    step = rank_step(compute_orders(adopted)[0], MEM.activation_tables(2)[0],
                     [10e-3] * 8, [20e-3] * 8)
    pol = generate_policy(step, int(need.budgets[0]), 1e3, 1e3, PRICING_POLICY).predicted
    hidden = max(pol.out_bytes, pol.in_bytes) / 1e3 - pol.stall_s
    assert need.copied_bytes[0] == pol.out_bytes + pol.in_bytes
    assert need.exposed_s >= pol.stall_s + 0.5 * hidden - 1e-12  # the worst rank's
    fast = generate_policy(step, int(need.budgets[0]), 1e12, 1e12, PRICING_POLICY)
    assert fast.predicted.peak_bytes <= need.budgets[0]  # copies keep up: within budget
    # a candidate: kept with its swap, priced in its step time, and the budgets travel
    c = ctx([1])
    cands, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=cap, swap=slow)
    red = next(x for x in cands if x.kind == "redundant")
    assert not red.fits and red.swap_budgets and red.swap_s == pytest.approx(need.exposed_s)
    assert "redundant" not in dropped
    score(cands, c, RecoveryConfig(), predict)
    assert red.predicted_step_s == pytest.approx(predict(red.plan) + red.swap_s)
    back = type(red).from_dict(red.to_dict())
    assert back.swap_budgets == red.swap_budgets and back.swap_s == red.swap_s
    assert red.row()["swap_ranks"] == len(red.swap_budgets)
    # a capacity swapping cannot reach is dropped, saying so
    tight = floor - 1
    _, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=tight, swap=slow)
    assert "even with swapping" in dropped["redundant"]


def test_the_swap_floor_is_where_chameleons_minimum_budget_makes_a_plan_infeasible():
    c = ctx([1])
    plans = [redundant(c).plan, reroute(c).plan, fresh_plan(c, [4, 3]),
             Plan.uniform(8, 2, 4, 8, 2, schedule="gpipe")]
    pricing = SwapPricing(host_Bps=1e9)
    for plan in plans:
        steps = RankSteps(plan, MEM)
        for r in plan.ranks:
            _, step = steps.step(r)
            assert steps.floor(r) == minimum_budget(step, PRICING_POLICY)
            assert steps.floor(r) >= max(rec.nbytes for rec in step.records)
        floor = swap_floor(plan, MEM, steps)
        assert swap_need(plan, MEM, floor - 1, pricing) is None, plan
        need = swap_need(plan, MEM, floor, pricing)
        assert need is not None and need.budgets, plan


def test_swapping_needs_host_memory_for_what_it_moves():
    # rank 0 under redundant keeps half its saved bytes resident: the other half lives on
    # the host at its peak; a host capacity below that makes the swap infeasible, and the
    # candidate is dropped saying the host is what is short
    adopted = redundant(ctx([1])).plan
    mem = plan_memory(adopted, MEM)[0]
    saved = 3 * MEM.saved_bytes(0, 4, 2)
    outs = mem.activations - saved
    cap = mem.static + outs + saved / 2
    roomy = SwapPricing(host_Bps=1e9, host_bytes=saved / 2)
    assert swap_need(adopted, MEM, cap, roomy) is not None
    short = SwapPricing(host_Bps=1e9, host_bytes=saved / 2 * 0.99)
    assert swap_need(adopted, MEM, cap, short) is None
    c = ctx([1])
    cands, dropped = build_candidates(c, predict, memory=MEM, capacity_bytes=cap, swap=short)
    assert all(x.kind != "redundant" or x.fits for x in cands)
    assert "needs more host memory than" in dropped.get("redundant", ""), dropped


def test_host_capacity_from_config():
    gib = 2**30
    assert RecoveryConfig().host_bytes(None, 4) == float("inf")  # unknown: unchecked
    assert RecoveryConfig().host_bytes(40 * gib, 4) == pytest.approx(9 * gib)  # 90% / 4
    assert RecoveryConfig(host_reserve="8GiB").host_bytes(40 * gib, 4) == 8 * gib
    assert RecoveryConfig(host_memory="16GiB").host_bytes(1.0, 4) == 16 * gib
    assert RecoveryConfig(host_memory="off").host_bytes(1.0, 4) == float("inf")
    with pytest.raises(ValueError, match="host_reserve"):
        RecoveryConfig(host_reserve="120%")
    with pytest.raises(ValueError, match="host_memory"):
        RecoveryConfig(host_memory="lots")

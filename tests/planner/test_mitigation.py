"""Straggler mitigation in the planner: the cost model prices a slow rank, the rebalance
search finds the best microbatch split, the speed-weighted partitioner moves layers off
the slow rank, and `plan_mitigation` switches only when it pays, its transition included
(and back once the straggler is gone)."""

from __future__ import annotations

import math
from itertools import combinations
from types import SimpleNamespace

import pytest

from planner.closed_form import estimate_plan
from planner.cost import CostModel
from planner.mitigation import (
    counts_of,
    layouts_of,
    plan_mitigation,
    rebalanced,
    repartitioned,
    with_counts,
)
from planner.partition import Partitioner
from planner.placement import RecoveryContext
from planner.plan import Plan
from planner.program import compile_plan
from planner.recovery import RecoveryConfig, build_candidates, choose, reroute, score
from planner.simulate import simulate, simulate_plan
from profiler import emulated_profile, loopback_comm

PROFILE = emulated_profile(SimpleNamespace(num_layers=8, forward_ms=10, backward_ms=20, dim=16),
                           comm=loopback_comm(0.0, 1e30, 0.0))


def predictor(slow: dict[int, float]):
    cost = CostModel(PROFILE, slowdown=slow)
    return lambda plan: simulate_plan(plan, cost).step_time_s


def test_slow_rank_scales_its_compute_in_every_simulator():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    fast, slow = CostModel(PROFILE), CostModel(PROFILE, slowdown={1: 3.0})
    t0 = simulate_plan(plan, fast).step_time_s
    t1 = simulate_plan(plan, slow).step_time_s
    assert t1 > 1.5 * t0
    # the reduced simulation (one pipeline per class) must not merge the slow pipeline
    assert t1 == pytest.approx(simulate(compile_plan(plan), slow).step_time_s, rel=1e-9)
    # one pipeline, bottleneck stage 3x: (m + S - 1) x per-stage time x 3 on the slow part
    single = Plan.uniform(8, 1, 4, 4, 1)
    est = estimate_plan(single, slow).pipeline_s
    assert est > estimate_plan(single, fast).pipeline_s * 1.5


def test_with_counts_gives_the_uniform_plan_back():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    skewed = with_counts(plan, [2, 6])
    assert counts_of(skewed) == [2, 6]
    assert with_counts(skewed, [4, 4]).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="do not deal"):
        with_counts(plan, [3, 3])


def test_rebalance_finds_the_best_split():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    predict = predictor({1: 3.0})  # rank 1: stage 1 of pipeline 0
    best = min(range(1, 8), key=lambda k: predict(with_counts(plan, [k, 8 - k])))
    assert counts_of(rebalanced(plan, predict)) == [best, 8 - best]
    assert best < 4
    # nobody slow: the even split is best
    assert counts_of(rebalanced(with_counts(plan, [2, 6]), predictor({}))) == [4, 4]


def test_mitigation_switches_when_it_pays_and_goes_back():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    cfg = RecoveryConfig()
    ctx = RecoveryContext(plan, plan.ranks, 9, [1.0] * 8)
    choice = plan_mitigation(ctx, predictor({1: 3.0}), cfg, min_gain=1.05)
    assert choice.switch and choice.chosen.kind == "rebalance"
    assert choice.chosen.transfers == [] and choice.chosen.resume_step == 10
    keep = next(c for c in choice.candidates if c.kind == "keep")
    assert keep.predicted_step_s > 1.3 * choice.chosen.predicted_step_s
    # back: the rebalanced plan without a straggler returns to the even split
    moved = choice.chosen.plan
    back = plan_mitigation(RecoveryContext(moved, moved.ranks, 30, [1.0] * 8),
                           predictor({}), cfg, min_gain=1.05)
    assert back.switch and back.chosen.plan.to_dict() == plan.to_dict()
    # nobody slow on the even plan: keep it
    assert not plan_mitigation(ctx, predictor({}), cfg, min_gain=1.05).switch


def test_small_gains_are_not_worth_a_switch():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    ctx = RecoveryContext(plan, plan.ranks, 9, [1.0] * 8)
    mild = plan_mitigation(ctx, predictor({1: 1.2}), RecoveryConfig(), min_gain=1.05)
    gain = mild.candidates[0].predicted_step_s / min(
        c.predicted_step_s for c in mild.candidates)
    assert gain < 1.3
    strict = plan_mitigation(ctx, predictor({1: 1.2}), RecoveryConfig(), min_gain=gain + 0.01)
    assert not strict.switch and strict.chosen.kind == "keep"


def test_one_pipeline_has_nothing_to_rebalance():
    plan = Plan.uniform(8, 1, 4, 8, 1)
    ctx = RecoveryContext(plan, plan.ranks, 3, [1.0] * 8)
    choice = plan_mitigation(ctx, predictor({2: 3.0}), RecoveryConfig(), min_gain=1.05)
    assert not choice.switch and [c.kind for c in choice.candidates] == ["keep"]


def test_speed_weighted_partition_is_optimal():
    times = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0]
    part = Partitioner(times, [0.0] * 8, [0.0] * 8, [0.0] * 8)
    speed = [1.0, 3.0, 1.0, 1.5]

    def bottleneck(b):
        return max(f * sum(times[x:y]) for f, x, y in zip(speed, b, b[1:]))

    best = min(bottleneck([0, *cut, 8]) for cut in combinations(range(1, 8), 3))
    bounds = part.solve(4, [1] * 4, math.inf, speed)
    assert bounds[0] == 0 and bounds[-1] == 8 and bottleneck(bounds) == pytest.approx(best)
    assert part.solve(4, [1] * 4, math.inf) == part.solve(4, [1] * 4, math.inf, [1.0] * 4)


def test_repartition_moves_layers_off_the_slow_rank_only_in_its_pipeline():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    split = repartitioned(plan, CostModel(PROFILE, slowdown={1: 3.0}))
    # rank 1 keeps one layer, rank 2 takes the other: the least bottleneck with the
    # fewest layers moved
    assert layouts_of(split) == [[0, 2, 3, 6, 8], [0, 2, 4, 6, 8]]
    assert counts_of(split) == counts_of(plan) and split.ranks == plan.ranks
    # nobody slow: unchanged, or back to `home`'s layout
    assert layouts_of(repartitioned(split, CostModel(PROFILE))) == layouts_of(split)
    assert repartitioned(split, CostModel(PROFILE), home=plan).to_dict() == plan.to_dict()


def test_repartition_is_chosen_with_its_transition_and_moved_back():
    plan = Plan.uniform(8, 2, 4, 8, 1)
    cfg = RecoveryConfig()
    ctx = RecoveryContext(plan, plan.ranks, 9, [1e6] * 8)
    cost = CostModel(PROFILE, slowdown={1: 3.0})
    choice = plan_mitigation(ctx, predictor({1: 3.0}), cfg, 1.05, cost=cost)
    by = {c.kind: c for c in choice.candidates}
    assert set(by) == {"keep", "rebalance", "repartition", "repartition+rebalance"}
    chosen = choice.chosen
    assert chosen.kind == "repartition+rebalance" and chosen is min(
        choice.candidates, key=lambda c: c.predicted_step_s)
    assert chosen.predicted_step_s < by["rebalance"].predicted_step_s
    # layers move: fetched from holders (a transition priced like a recovery's)
    assert [(t.layer, t.src, t.dst) for t in chosen.transfers] == [(3, 1, 2)]
    assert chosen.predicted_transition_s == pytest.approx(cfg.rebuild_s + 1e6 / cfg.transfer_Bps)
    # back once nobody is slow: its layers return, the failure-free plan again
    moved = chosen.plan
    back = plan_mitigation(RecoveryContext(moved, moved.ranks, 30, [1e6] * 8), predictor({}),
                           cfg, 1.05, cost=CostModel(PROFILE), home=plan)
    assert back.switch and back.chosen.plan.to_dict() == plan.to_dict()
    assert [(t.layer, t.src, t.dst) for t in back.chosen.transfers] == [(3, 2, 1)]


def test_a_slow_transition_over_a_short_horizon_keeps_the_state_in_place():
    # moving 10 GB per layer at 500 MB/s over a 60 s horizon: rebalance (no state moves)
    plan = Plan.uniform(8, 2, 4, 8, 1)
    ctx = RecoveryContext(plan, plan.ranks, 9, [10e9] * 8)
    choice = plan_mitigation(ctx, predictor({1: 3.0}), RecoveryConfig(horizon_s=60.0), 1.05,
                             cost=CostModel(PROFILE, slowdown={1: 3.0}))
    assert choice.chosen.kind == "rebalance"
    split = next(c for c in choice.candidates if c.kind == "repartition+rebalance")
    assert split.predicted_step_s < choice.chosen.predicted_step_s  # faster, not worth it


def test_one_pipeline_is_repartitioned():
    plan = Plan.uniform(8, 1, 4, 8, 1)
    ctx = RecoveryContext(plan, plan.ranks, 3, [1.0] * 8)
    choice = plan_mitigation(ctx, predictor({2: 3.0}), RecoveryConfig(), 1.05,
                             cost=CostModel(PROFILE, slowdown={2: 3.0}))
    assert choice.chosen.kind == "repartition"
    stage = choice.chosen.plan.stage(2)
    assert stage.end - stage.start == 1


def test_a_rerouted_pipeline_keeps_its_shared_stage_boundaries():
    # DP 2 x PP 2, rank 2 lost and rerouted to rank 0 (stage 0 of both pipelines), then
    # rank 3 slow: moving a layer onto rank 0 in pipeline 1 only would give rank 0 two
    # layer ranges (once, the live leader crashed on exactly that); the pipeline keeps
    # its boundaries and rebalancing is what is left
    plan = Plan.uniform(8, 2, 2, 4, 1)
    rerouted = reroute(RecoveryContext(plan, [0, 1, 3], 13, [1e6] * 8)).plan
    assert [p.ranks for p in rerouted.pipelines] == [[0, 1], [0, 3]]
    cost = CostModel(PROFILE, slowdown={3: 3.0})
    assert layouts_of(repartitioned(rerouted, cost)) == layouts_of(rerouted)
    ctx = RecoveryContext(rerouted, rerouted.ranks, 17, [1e6] * 8)
    choice = plan_mitigation(ctx, predictor({3: 3.0}), RecoveryConfig(), 1.05, cost=cost)
    assert {c.kind for c in choice.candidates} == {"keep", "rebalance"}
    assert choice.chosen.kind == "rebalance" and choice.chosen.plan.ranks == rerouted.ranks


def _with_drop(slow: dict[int, float], plan: Plan, drop_gain: float = 1.25):
    predict = predictor(slow)
    ctx = RecoveryContext(plan, plan.ranks, 9, [1e6] * 8)
    return plan_mitigation(ctx, predict, RecoveryConfig(), 1.05,
                           cost=CostModel(PROFILE, slowdown=slow),
                           recover=lambda c: build_candidates(c, predict)[0],
                           drop_gain=drop_gain)


def test_a_much_slower_rank_is_dropped_and_a_mildly_slow_one_worked_around():
    plan = Plan.uniform(8, 2, 2, 8, 1)
    # 3x: moving a layer and re-dealing microbatches is as fast as leaving, and in place
    mild = _with_drop({3: 3.0}, plan)
    by = {c.kind: c for c in mild.candidates}
    assert by["drop"].predicted_step_s == pytest.approx(
        by["repartition+rebalance"].predicted_step_s, rel=0.05)
    assert mild.chosen.kind == "repartition+rebalance"
    # 20x: nothing in place comes close; rank 3 leaves and the survivors recover as a
    # failure of rank 3 would (the same builder and choice), the aborted step priced in
    far = _with_drop({3: 20.0}, plan)
    drop = far.chosen
    assert drop.kind == "drop" and 3 not in drop.plan.ranks, far.rows()
    predict = predictor({3: 20.0})
    without = RecoveryContext(plan, [0, 1, 2], 9, [1e6] * 8)
    cands, _ = build_candidates(without, predict)
    score(cands, without, RecoveryConfig(), predict)
    then = choose(cands, RecoveryConfig())
    assert drop.plan.to_dict() == then.plan.to_dict() and then.kind in drop.note
    keep = next(c for c in far.candidates if c.kind == "keep")
    assert drop.predicted_transition_s == pytest.approx(
        then.predicted_transition_s + keep.predicted_step_s)
    # without a builder (a launcher that cannot fence) nobody is dropped
    ctx = RecoveryContext(plan, plan.ranks, 9, [1e6] * 8)
    assert "drop" not in {c.kind for c in plan_mitigation(
        ctx, predict, RecoveryConfig(), 1.05, cost=CostModel(PROFILE, slowdown={3: 20.0})
    ).candidates}


def test_dropping_must_clearly_beat_working_around():
    # 6x: leaving is predicted 8% faster than repartition+rebalance, under the default
    # 25% bar (irreversible); with the bar just under that edge it is taken, just over not
    plan = Plan.uniform(8, 2, 2, 8, 1)
    choice = _with_drop({3: 6.0}, plan)
    by = {c.kind: c for c in choice.candidates}
    edge = by["repartition+rebalance"].predicted_step_s / by["drop"].predicted_step_s
    assert 1.05 < edge < 1.25 and choice.chosen.kind == "repartition+rebalance"
    assert _with_drop({3: 6.0}, plan, drop_gain=edge * 0.99).chosen.kind == "drop"
    assert _with_drop({3: 6.0}, plan, drop_gain=edge * 1.01).chosen.kind != "drop"


def test_a_far_slower_rank_is_parked_its_stage_rerouted_through_its_replica():
    # 20x, dp 2 x pp 2 with 4 microbatches (rebalancing leaves its pipeline one at 20x):
    # parking rank 3 reroutes its pipeline through rank 1, nothing moves, and it beats
    # every in-place work-around; only parkable ranks are parked
    plan = Plan.uniform(8, 2, 2, 4, 1)
    slow = {3: 20.0}
    predict = predictor(slow)
    ctx = RecoveryContext(plan, plan.ranks, 9, [1e6] * 8)

    def mitigate(parkable, **kw):
        return plan_mitigation(ctx, predict, RecoveryConfig(), 1.05,
                               cost=CostModel(PROFILE, slowdown=slow),
                               recover=lambda c: build_candidates(c, predict)[0],
                               parkable=parkable, **kw)

    choice = mitigate([3], can_drop=False)
    park = choice.chosen
    assert park.kind == "park" and choice.leaving == [3], choice.rows()
    assert 3 not in park.plan.ranks and not park.transfers
    assert park.plan.to_dict() == reroute(RecoveryContext(plan, [0, 1, 2], 9,
                                                          [1e6] * 8)).plan.to_dict()
    assert [st.rank for st in park.plan.pipelines[1].stages] == [2, 1]  # via its replica
    keep = next(c for c in choice.candidates if c.kind == "keep")
    assert park.predicted_transition_s >= keep.predicted_step_s  # the aborted step
    in_place = [c for c in choice.candidates if c.kind not in ("keep", "park")]
    assert in_place and all(c.predicted_step_s > park.predicted_step_s for c in in_place)
    # parking is reversible: no drop bar; dropping (irreversible) must beat it clearly
    assert mitigate([3]).chosen.kind == "park"
    # rank 3 not parkable (e.g. the leader), or no builder: no park candidate
    for off in (mitigate([], can_drop=False), mitigate(None, can_drop=False)):
        assert "park" not in {c.kind for c in off.candidates} and off.leaving == []

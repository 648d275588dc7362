"""Recovery candidates and the choice, on plans alone (no process group)."""

import pytest

from odyssey.emulate import EmulationConfig
from planner import Plan, PlanError, compile_plan
from planner.cost import CostModel
from planner.placement import fresh_plan, fresh_plans, pipeline_counts, transfers
from planner.recovery import (
    RecoveryCandidate,
    RecoveryConfig,
    RecoveryContext,
    build_candidates,
    choose,
    redundant,
    reparallelize,
    reroute,
    restart,
    score,
)
from planner.simulate import simulate_plan
from profiler.synthetic import emulated_profile

COST = CostModel(emulated_profile(EmulationConfig(num_layers=8, forward_ms=10,
                                                  backward_ms=20)))


def predict(plan: Plan) -> float:
    return simulate_plan(plan, COST).step_time_s


def ctx(dead, ckpt=None, plan=None, newcomers=()):
    plan = plan or Plan.uniform(8, 2, 4, 8, 2)
    members = sorted((set(plan.ranks) - set(dead)) | set(newcomers))
    return RecoveryContext(plan, members, 10, [1e6] * 8, ckpt, list(newcomers))


def test_reroute_shares_the_peer_stage_and_moves_nothing():
    c = reroute(ctx([1]))
    assert c.plan.pipelines[0].ranks == [0, 5, 2, 3] and c.transfers == []
    assert c.plan.has_shared_stages and c.resume_step == 11
    compile_plan(c.plan)  # schedulable


def test_redundant_neighbour_adopts_layers_from_a_replica():
    c = redundant(ctx([1]))
    assert [(s.rank, s.start, s.end) for s in c.plan.pipelines[0].stages] == \
        [(0, 0, 4), (2, 4, 6), (3, 6, 8)]
    assert [(t.layer, t.src, t.dst) for t in c.transfers] == [(2, 5, 0), (3, 5, 0)]


def test_reparallelize_uses_every_survivor_and_splits_microbatches_by_speed():
    cands = reparallelize(ctx([1]), predict)
    two = next(c for c in cands if len(c.plan.pipelines) == 2)
    assert two.plan.world_size == 7
    assert sorted(len(p.stages) for p in two.plan.pipelines) == [3, 4]
    short, long_ = sorted(two.plan.pipelines, key=lambda p: len(p.stages))
    assert len(long_.microbatches) >= len(short.microbatches)  # the 4-stage one is faster
    # every transfer comes from a surviving holder of that layer
    for t in two.transfers:
        assert t.src != 1 and t.src in Plan.uniform(8, 2, 4, 8, 2).holders(t.layer)


def test_fresh_plan_keeps_layers_in_place_and_fetches_only_what_is_missing():
    c = ctx([1])  # 2 x 4 stages of 2 layers; rank 1 held layers 2..3
    one = fresh_plan(c, [7])  # 7 stages: [0, 2) then one layer each
    assert [(s.rank, s.start, s.end) for s in one.pipelines[0].stages] == [
        (0, 0, 2), (5, 2, 3), (4, 3, 4), (2, 4, 5), (6, 5, 6), (3, 6, 7), (7, 7, 8)]
    # only layer 3 moves, from its only survivor (the optimal assignment; the greedy
    # one moved 3 layers: tests/planner/test_assignment.py)
    assert [(t.layer, t.src, t.dst) for t in transfers(c, one)] == [(3, 5, 4)]
    two = fresh_plan(c, [4, 3])  # unequal: microbatches by the longest stage (no predict)
    assert [[(s.rank, s.start, s.end) for s in p.stages] for p in two.pipelines] == [
        [(0, 0, 2), (5, 2, 4), (2, 4, 6), (3, 6, 8)], [(4, 0, 3), (6, 3, 6), (7, 6, 8)]]
    assert [len(p.microbatches) for p in two.pipelines] == [5, 3]
    assert [(t.layer, t.src, t.dst) for t in transfers(c, two)] == [(2, 5, 4), (3, 5, 6)]
    # one plan per pipeline count 1..7; with a predictor only the 6 fastest
    assert pipeline_counts(c) == list(range(1, 8))
    assert len(fresh_plans(c)) == 7 and len(fresh_plans(c, predict)) == 6
    # screened (more members than exact_upto): the best counts by the length estimate
    est = [9.0, 1.0, 5.0, 2.0, 7.0, 3.0, 4.0]
    assert pipeline_counts(c, lambda n, m, dp: est[dp - 1], exact_upto=4, screen=3) == [2, 4, 6]


def test_transfers_rotate_over_surviving_replicas():
    plan = Plan.uniform(4, 4, 1, 4, 1)  # four replicas of all 4 layers
    c = RecoveryContext(plan, [0, 1, 2, 4, 5], 3, [1.0] * 4, None, [4, 5])
    new = Plan.uniform(4, 1, 2, 4, 1, ranks=[4, 5])
    assert [(t.layer, t.src, t.dst) for t in transfers(c, new)] == [
        (0, 0, 4), (1, 1, 4), (2, 2, 5), (3, 0, 5)]
    with pytest.raises(PlanError, match="layer 0 has no surviving replica"):
        transfers(RecoveryContext(plan, [4], 3, [1.0] * 4, None, [4]),
                  Plan.uniform(4, 1, 1, 4, 1, ranks=[4]))


def test_no_replica_leaves_only_restart():
    c = ctx([1, 5], ckpt=7)  # both holders of layers 2..3 are gone
    cands, dropped = build_candidates(c, predict)
    assert {x.kind for x in cands} == {"restart"}
    assert set(dropped) == {"reroute", "redundant", "reparallelize"}
    assert "no surviving" in dropped["reroute"] and "layer 2" in dropped["redundant"]
    r = cands[0]
    assert r.from_checkpoint and r.resume_step == 8 and r.lost_steps == 3


def test_restart_without_checkpoint_starts_over():
    r = restart(ctx([1, 5]), predict)[0]
    assert r.resume_step == 0 and r.lost_steps == 11


def test_choice_maximises_work_over_the_horizon_and_honours_fixed_policies():
    c = ctx([1], ckpt=9)
    cands, _ = build_candidates(c, predict)
    score(cands, c, RecoveryConfig(horizon_s=600), predict)
    best = choose(cands, RecoveryConfig())
    assert best.score == max(x.score for x in cands)
    assert choose(cands, RecoveryConfig(policy="restart")).kind == "restart"
    # a short horizon penalises slow transitions: restart (redoing a step) loses
    for x in cands:
        expect = (600 - x.predicted_transition_s) / x.predicted_step_s * 16
        assert x.score == pytest.approx(expect)
    with pytest.raises(ValueError, match="unknown recovery policy"):
        choose(cands, RecoveryConfig(policy="bogus"))


def test_fixed_policy_falls_back_when_infeasible():
    c = ctx([1, 5], ckpt=7)
    cands, _ = build_candidates(c, predict)
    score(cands, c, RecoveryConfig(), predict)
    assert choose(cands, RecoveryConfig(policy="reroute")).kind == "restart"


def test_newcomer_replans_upward():
    after = reroute(ctx([1])).plan
    c = RecoveryContext(after, [0, 2, 3, 4, 5, 6, 7, 8], 20, [1e6] * 8, None, [8])
    cands, dropped = build_candidates(c, predict)
    assert "reroute" in dropped and "redundant" in dropped
    best = max((x for x in cands if x.kind == "reparallelize"),
               key=lambda x: -predict(x.plan))
    assert best.plan.world_size == 8 and any(t.dst == 8 for t in best.transfers)


def test_candidate_roundtrip():
    c = redundant(ctx([1]))
    assert RecoveryCandidate.from_dict(c.to_dict()).plan == c.plan


def test_reroute_rejects_newcomers():
    with pytest.raises(PlanError, match="newcomers"):
        reroute(ctx([], newcomers=[8]))


HEAVY_TAIL = CostModel(emulated_profile(EmulationConfig(
    num_layers=8, forward_ms=(5, 5, 5, 5, 5, 5, 30, 30), backward_ms=(10,) * 6 + (60, 60))))


def _bottleneck(plan: Plan, cost: CostModel) -> float:
    fwd, bwd = cost.layer_times(plan.microbatch_size)
    return max(sum(fwd[a] + bwd[a] for a in range(st.start, st.end))
               for p in plan.pipelines for st in p.stages)


def test_fresh_plans_split_layers_by_predicted_time():
    # two heavy last layers: an even split puts both on one stage, a split by time
    # gives each its own stage; every pipeline count is at least as fast, some faster
    def heavy_predict(plan):
        return simulate_plan(plan, HEAVY_TAIL).step_time_s

    def by_count(cands):
        return {len(x.plan.pipelines): x.plan for x in cands if x.kind == "reparallelize"}

    c = ctx([1])
    even = by_count(build_candidates(c, heavy_predict)[0])
    timed = by_count(build_candidates(c, heavy_predict,
                                      partitioner=HEAVY_TAIL.partitioner(2))[0])
    common = even.keys() & timed.keys()
    assert {2, 3} <= timed.keys() and len(common) >= 4
    for dp in common:
        assert _bottleneck(timed[dp], HEAVY_TAIL) <= _bottleneck(even[dp], HEAVY_TAIL)
        assert heavy_predict(timed[dp]) <= heavy_predict(even[dp]) * (1 + 1e-9)
    assert heavy_predict(even[3]) / heavy_predict(timed[3]) > 1.15
    assert all([(s.start, s.end) for s in p.stages][-2:] == [(6, 7), (7, 8)]
               for p in timed[2].pipelines)  # each heavy layer on a stage of its own
    # the choice among them: by time, two pipelines are as fast as seven replicas
    assert min(map(heavy_predict, timed.values())) <= min(map(heavy_predict, even.values()))


def test_a_split_by_time_keeps_within_the_memory_limit():
    from planner.partition import Partitioner
    from planner.placement import balanced_split

    # layer 7 holds big parameters (10 vs 1): by time alone 4 + 4 layers; under a
    # capacity of 11 layer 7 shares its stage with one layer at most
    def part():
        return Partitioner([1] * 7 + [0.5], [1] * 7 + [10], [0] * 8, [0] * 8)

    assert balanced_split(part(), "1f1b")(2, 4) == [4, 4]
    assert balanced_split(part(), "1f1b", memory_limit=11)(2, 4) == [6, 2]
    # no split fits: the one that needs least memory (swapping may still fit it)
    assert balanced_split(part(), "1f1b", memory_limit=5)(2, 4) == [7, 1]


def test_the_cluster_screen_splits_layers_as_the_fresh_plans_do():
    from planner.closed_form import pipeline_s
    from planner.cluster.predict import Predictor
    from planner.placement import balanced_split
    from planner.plan import even_partition

    def estimate(sizes, m):
        b = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        fwd = [HEAVY_TAIL.forward_s(b[i], b[i + 1], 1) for i in range(len(sizes))]
        bwd = [HEAVY_TAIL.backward_s(b[i], b[i + 1], 1) for i in range(len(sizes))]
        return pipeline_s("1f1b", fwd, bwd, m)

    pr = Predictor(HEAVY_TAIL, "closed-form", 1.0)
    split = balanced_split(HEAVY_TAIL.partitioner(1), "1f1b")
    for length in (2, 3, 4):
        sizes = split(length, 8)
        # dp=1: no all-reduce, the screen is the pipeline alone
        assert pr.by_length(length, 8, 1) == pytest.approx(estimate(sizes, 8))
        assert pr.by_length(length, 8, 1) <= estimate(even_partition(8, length), 8)
    assert pr.by_length(3, 8, 1) < 0.9 * estimate(even_partition(8, 3), 8)  # heavy tail

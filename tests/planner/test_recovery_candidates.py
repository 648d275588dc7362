"""Recovery candidates and the choice, on plans alone (no process group)."""

import pytest

from odyssey.emulate import EmulationConfig
from planner import Plan, PlanError, compile_plan
from planner.cost import CostModel
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

"""Cluster-scale trace simulator: event logic, policies, candidates (planner/cluster/)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from planner.closed_form import estimate_plan, pipeline_s
from planner.cluster.policies import Costs, make_policy
from planner.cluster.predict import Predictor, layer_state_bytes
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig, simulate_trace
from planner.cluster.traces import TraceEvent, initial_nodes
from planner.cost import CostConfig, CostModel
from planner.placement import pipeline_counts
from planner.plan import Plan, PlanError
from planner.recovery import RecoveryConfig, RecoveryContext, build_candidates, choose, score
from planner.simulate import simulate_plan
from profiler.synthetic import FormulaConfig, emulated_profile, formula_profile

F_MS, B_MS, LAYERS = 10.0, 20.0, 8
CLUSTER = ClusterConfig(num_nodes=2, gpus_per_node=4, trace_node_gpus=1)


@pytest.fixture(scope="module")
def cost() -> CostModel:
    cfg = SimpleNamespace(num_layers=LAYERS, forward_ms=F_MS, backward_ms=B_MS, dim=64)
    return CostModel(emulated_profile(cfg), CostConfig(ranks_per_node=4))


def plan8() -> Plan:
    return Plan.uniform(LAYERS, dp=2, pp=4, num_microbatches=8, microbatch_size=2)


def tc(**kw) -> TransitionConfig:
    base = dict(detect_s=0.1, agree_s=0.2, plan_s=0.3, rebuild_s=0.4, transfer_Bps=1e9,
                restart_s=30.0, heartbeat_timeout_s=5.0, checkpoint_write_Bps=1e6,
                checkpoint_load_Bps=1e6, checkpoint_interval_s=None)
    base.update(kw)
    return TransitionConfig(**base)


def run(policy, cost, events, duration, **kw):
    return simulate_trace(policy, plan8(), cost, events, CLUSTER, kw.pop("tc", tc()),
                          SimConfig(duration_s=duration, horizon_s=600.0), **kw)


def test_restart_charges_lost_work_since_last_checkpoint(cost):
    step = estimate_plan(plan8(), cost).step_s
    write = sum(layer_state_bytes(cost)) / 1e6
    t_fail = 25.5 * step + 2 * write  # ckpts after steps 10 and 20; step 26 in flight
    events = [*initial_nodes(8), TraceEvent(t_fail, "remove", "node5")]
    trans = tc(checkpoint_interval_s=10 * step)
    stall = 0.1 + 30.0 + sum(layer_state_bytes(cost)) / 1e6
    end = t_fail + stall + 1e-3  # before the first step of the new plan ends
    r = run("restart", cost, events, end, tc=trans)
    assert r.steps == 20 and r.samples == 20 * 16  # rolled back to the checkpoint
    assert r.lost_work_s == pytest.approx(5.5 * step)  # 5 steps + the aborted half step
    assert r.stall_s == pytest.approx(stall)
    assert r.kinds == {"restart": 1} and r.checkpoint_s == pytest.approx(2 * write)
    # the in-place policies keep the committed steps: only the aborted step is lost
    a = run("adaptive", cost, events, end, tc=trans)
    assert a.lost_work_s == pytest.approx(0.5 * step)
    assert a.samples >= 25 * 16


def test_drop_replica_loses_its_samples(cost):
    events = [*initial_nodes(8), TraceEvent(10.0, "remove", "node5")]
    r = run("drop-replica", cost, events, 60.0, tc=tc(checkpoint_interval_s=1e9))
    assert r.kinds == {"drop": 1}
    assert r.stall_s == pytest.approx(5.0 + 0.4)  # heartbeat timeout + quorum rebuild
    full = plan8().global_batch
    after = r.steps - int(10.0 / estimate_plan(plan8(), cost).step_s)
    assert after > 10
    assert r.samples_dropped == pytest.approx(after * full / 2)  # pipeline 1's half
    assert r.samples + r.samples_dropped == pytest.approx(r.steps * full)
    # the node comes back: the replica group re-forms and the batch is whole again
    back = run("drop-replica", cost, [*events, TraceEvent(30.0, "add", "node5")], 60.0,
               tc=tc(checkpoint_interval_s=1e9))
    assert back.kinds == {"drop": 1, "heal": 1}
    assert back.samples_dropped < r.samples_dropped
    assert back.samples > r.samples


def test_redundant_pays_overhead_without_failures(cost):
    events = initial_nodes(8)
    trans = tc(checkpoint_interval_s=1e9)
    plain = run("adaptive", cost, events, 100.0, tc=trans)
    red = run("redundant", cost, events, 100.0, tc=trans)
    assert plain.transitions == red.transitions == 0
    step = estimate_plan(plan8(), cost).step_s
    f, b, m = [2 * F_MS / 1e3] * 4, [2 * B_MS / 1e3] * 4, 4  # 2 layers per stage
    rc = [x + x for x in f]  # each stage also runs its successor's forward
    step_rc = step + pipeline_s("1f1b", rc, b, m) - pipeline_s("1f1b", f, b, m)
    assert red.steps == int(100.0 / step_rc)
    assert plain.steps == int(100.0 / step)
    assert red.samples_per_s < plain.samples_per_s * 0.85


@pytest.mark.parametrize("policy", ["adaptive", "reroute", "reparallelize", "redundant"])
def test_policy_picks_what_choose_picks(cost, policy):
    plan, lb = plan8(), layer_state_bytes(cost)
    members = [r for r in plan.ranks if r != 5]
    predict = Predictor(cost, "closed-form", 1.0)
    costs = Costs(0.1, 0.2, 0.3, 0.4, 1e9, 30.0, 5.0, 1.0)
    pol = make_policy(policy, cost, costs, lb, predict, predict.by_length, 600.0)
    got = pol.react(plan, members, 12, 8, lost=True)
    # the live leader's path: recovery.build_candidates + score + choose
    ctx = RecoveryContext(plan, members, 12, lb, 8)
    cands, _ = build_candidates(ctx, predict)
    rc = RecoveryConfig(policy=policy, horizon_s=600.0, transfer_Bps=1e9,
                        rebuild_s=costs.in_place_s - costs.detect_s,
                        checkpoint_load_Bps=sum(lb) / 1.0)
    score(cands, ctx, rc, predict)
    want = choose(cands, rc)
    assert got.kind == want.kind and got.plan.to_dict() == want.plan.to_dict()
    assert not got.fallback


def _check_candidates(plan, members, cands, dropped):
    """Every candidate is a valid plan over members; each member fetches exactly the
    layers it lacks, from a surviving holder; fresh plans use every member."""
    alive = set(members)
    for c in cands:
        c.plan.validate()
        assert set(c.plan.ranks) <= alive, c.kind
        if c.kind in ("reparallelize", "restart"):
            assert c.plan.ranks == sorted(members)
        if c.from_checkpoint:
            assert c.transfers == []
            continue
        need = {(layer, r) for r in c.plan.ranks for layer in c.plan.stage(r).layers
                if not (plan.has_rank(r) and layer in plan.stage(r).layers)}
        assert {(t.layer, t.dst) for t in c.transfers} == need
        assert len(c.transfers) == len(need)
        for t in c.transfers:
            assert t.src in alive and t.src in plan.holders(t.layer)
    kinds = {c.kind for c in cands}
    assert kinds | set(dropped) >= {"reroute", "redundant", "reparallelize"}
    assert not kinds & set(dropped)


def test_candidates_of_random_failures_are_valid_plans():
    prof = formula_profile(FormulaConfig(preset="gpt3-1.3b"))
    cost = CostModel(prof, CostConfig(ranks_per_node=8))
    predict = Predictor(cost, "closed-form", 1.0)
    lb = [float(i + 1) for i in range(prof.num_layers)]
    rng = random.Random(0)
    cases = 0
    for dp, pp in [(4, 4), (8, 4), (2, 8), (6, 5), (3, 3)]:
        plan = Plan.uniform(prof.num_layers, dp, pp, 4 * dp, 1)
        for trial in range(4):
            dead = rng.sample(plan.ranks, rng.randint(1, 3))
            members = [r for r in plan.ranks if r not in dead]
            if trial == 3:  # a newcomer
                members.append(max(plan.ranks) + 1)
            newcomers = [r for r in members if not plan.has_rank(r)]
            ctx = RecoveryContext(plan, members, 10, lb, 5, newcomers)
            cands, dropped = build_candidates(ctx, predict)
            _check_candidates(plan, members, cands, dropped)
            fresh = [c for c in cands if c.kind == "restart"]
            assert 1 <= len(fresh) <= 6  # the fastest fresh plans, one per pipeline count
            if newcomers:
                assert {"reroute", "redundant"} <= set(dropped)
            cases += 1
    assert cases == 20


def test_cluster_scale_candidates_screen_pipeline_counts():
    prof = formula_profile(FormulaConfig(preset="gpt3-1.3b"))
    cost = CostModel(prof, CostConfig(ranks_per_node=8))
    predict = Predictor(cost, "closed-form", 1.0)
    plan = Plan.uniform(prof.num_layers, 32, 8, 64, 1)  # 256 ranks
    members = [r for r in plan.ranks if r // 8 != 5]  # one node lost
    ctx = RecoveryContext(plan, members, 10, layer_state_bytes(cost), 5)
    cands, dropped = build_candidates(ctx, predict, predict_len=predict.by_length)
    _check_candidates(plan, members, cands, dropped)
    counts = sorted(len(c.plan.pipelines) for c in cands if c.kind == "reparallelize")
    screened = pipeline_counts(ctx, predict.by_length)  # 248 ranks > exact_upto
    assert len(pipeline_counts(ctx)) > len(screened) == 6 and counts == sorted(screened)
    reroute = next(c for c in cands if c.kind == "reroute")
    assert reroute.transfers == [] and reroute.plan.has_shared_stages


def test_shared_stage_prediction_close_to_event_simulator():
    from planner.recovery import reroute
    prof = formula_profile(FormulaConfig(preset="gpt3-1.3b"))
    cost = CostModel(prof, CostConfig(ranks_per_node=8))
    for dp, pp, m, dead in [(4, 4, 32, [5]), (8, 4, 64, [5, 9]), (4, 4, 32, [0]),
                            (4, 4, 32, [3, 7]), (3, 8, 24, [12])]:
        plan = Plan.uniform(prof.num_layers, dp, pp, m, 1)
        ctx = RecoveryContext(plan, [r for r in plan.ranks if r not in dead], 3,
                              [1.0] * prof.num_layers)
        rerouted = reroute(ctx).plan
        sim = simulate_plan(rerouted, cost).step_time_s
        bound = Predictor(cost, "closed-form", 1.0)
        bound.event_upto = 0  # force the closed form + shared-stage bound
        fast = bound(rerouted)
        assert -0.08 < fast / sim - 1 < 0.01, (dead, fast, sim)
        assert fast > estimate_plan(plan, cost).step_s * 1.1  # the shared stage shows
        assert Predictor(cost, "closed-form", 1.0)(rerouted) == pytest.approx(sim)


def test_straggler_slows_every_policy_until_it_ends(cost):
    base = initial_nodes(8)
    slow = [*base, TraceEvent(10.0, "slow", "node2", 3.0), TraceEvent(40.0, "slow", "node2", 1)]
    trans = tc(checkpoint_interval_s=1e9)
    # adaptive re-plans around it: tests/planner/test_cluster_stragglers.py
    a = run("reparallelize", cost, base, 60.0, tc=trans)
    b = run("reparallelize", cost, slow, 60.0, tc=trans)
    assert b.transitions == 0 and b.samples < a.samples * 0.8


def test_bad_inputs(cost):
    with pytest.raises(PlanError, match="not the"):
        run("adaptive", cost, initial_nodes(7), 10.0)
    with pytest.raises(PlanError, match="unknown policy"):
        run("bogus", cost, initial_nodes(8), 10.0)
    with pytest.raises(PlanError, match="must divide"):
        ClusterConfig(2, 4, 3).check()


def test_odyssey_simulate_cli(tmp_path, capsys):
    from launch.cli import main
    trace = tmp_path / "t.csv"
    lines = [f"0,add,node{i}" for i in range(8)]
    lines += ["1800000,remove,node3", "3600000,add,node3", "5400000,remove,node6"]
    trace.write_text("\n".join(lines) + "\n")
    rc = main(["simulate", "--preset", "gpt3-125m", "--num-nodes", "2", "--gpus-per-node",
               "4", "--trace", str(trace), "--global-batch", "64", "--duration-s", "7200",
               "--out", str(tmp_path / "out"), "--name", "t"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for policy in ("adaptive", "reroute", "reparallelize", "redundant", "restart",
                   "drop-replica"):
        assert f"| {policy} |" in out
    js = json.loads((tmp_path / "out" / "t.json").read_text())
    assert {r["policy"] for r in js["results"]} >= {"adaptive", "restart"}
    assert all(r["transitions"] == 3 for r in js["results"])
    for png in ("t-timeline.png", "t-bars.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2


def test_rerouted_plan_is_not_served_from_the_original_plans_cache(cost):
    from planner.recovery import reroute
    plan = plan8()
    predict = Predictor(cost, "closed-form", 1.0)
    before = predict(plan)
    rerouted = reroute(RecoveryContext(plan, [r for r in plan.ranks if r != 5], 3,
                                       [1.0] * LAYERS)).plan
    assert predict(rerouted) == pytest.approx(simulate_plan(rerouted, cost).step_time_s)
    assert predict(rerouted) > before * 1.2


def test_membership_spares_fill_freed_domains():
    from planner.cluster.membership import Membership
    m = Membership(ClusterConfig(num_nodes=1, gpus_per_node=4, trace_node_gpus=2))
    for e in [*initial_nodes(3)]:  # 2 domains: node2 waits as a spare
        m.apply(e)
    assert m.members() == [0, 1, 2, 3] and m.spares == ["node2"]
    m.apply(TraceEvent(5.0, "remove", "node0"))
    assert m.members() == [0, 1, 2, 3] and m.ranks_of_node("node2") == [0, 1]


def test_everything_lost_then_back_restarts_from_checkpoint(cost):
    events = [*initial_nodes(8), *[TraceEvent(10.0, "remove", f"node{i}") for i in range(8)],
              *[TraceEvent(20.0, "add", f"node{i}") for i in range(8)]]
    r = run("adaptive", cost, events, 40.0, tc=tc(checkpoint_interval_s=3.0))
    assert r.kinds == {"restart": 1} and r.transitions == 1
    assert any("no GPU left" in n for n in r.notes)
    assert r.lost_work_s > 0

"""Two-phase candidates on plans alone: what they hold, how they score, when they win,
what memory they need, and the cluster simulator's switch (no process group)."""

import math
from types import SimpleNamespace

import pytest

from odyssey.emulate import EmulationConfig
from planner import Plan
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig, simulate_trace
from planner.cluster.traces import TraceEvent, initial_nodes
from planner.cost import CostConfig, CostModel
from planner.memory import plan_memory
from planner.placement import RecoveryContext, rounds_s, transfers
from planner.recovery import (
    SWITCH_STEPS,
    RecoveryCandidate,
    RecoveryConfig,
    build_candidates,
    choose,
    score,
)
from planner.simulate import simulate_plan
from profiler.synthetic import emulated_profile

COST = CostModel(emulated_profile(EmulationConfig(num_layers=8, forward_ms=10,
                                                  backward_ms=20)))
PLAN = Plan.uniform(8, 2, 4, 8, 2)  # 2 pipelines x 4 stages of 2 layers


def predict(plan: Plan) -> float:
    return simulate_plan(plan, COST).step_time_s


def ctx(dead=(1,), layer_bytes=1e6) -> RecoveryContext:
    members = sorted(set(PLAN.ranks) - set(dead))
    return RecoveryContext(PLAN, members, 10, [layer_bytes] * 8)


def scored(c: RecoveryContext, cfg: RecoveryConfig, **kw) -> list[RecoveryCandidate]:
    cands, _ = build_candidates(c, predict, two_phase=True, **kw)
    score(cands, c, cfg, predict)
    return cands


def test_each_reparallelize_that_moves_state_pairs_with_the_reroute():
    c = ctx()
    cands, dropped = build_candidates(c, predict, two_phase=True)
    first = next(x for x in cands if x.kind == "reroute")
    later = [x for x in cands if x.kind == "reparallelize" and x.transfers]
    pairs = [x for x in cands if x.kind == "two-phase"]
    assert later and len(pairs) == len(later) and "two-phase" not in dropped
    for p in pairs:
        assert p.plan is first.plan and p.transfers == [] and p.resume_step == 11
        assert p.then in later
        incoming = {}
        for t in p.then.transfers:
            incoming[t.dst] = incoming.get(t.dst, 0.0) + t.nbytes
        assert p.shadow_bytes == incoming
    # off by default: the other callers' candidates are unchanged
    assert all(x.kind != "two-phase" for x in build_candidates(c, predict)[0])
    # no reroute (a newcomer joins): no pair, and the reason says so
    grown = RecoveryContext(PLAN, [*PLAN.ranks, 8], 10, [1e6] * 8, None, [8])
    cands, dropped = build_candidates(grown, predict, two_phase=True)
    assert all(x.kind != "two-phase" for x in cands) and "reroute" in dropped["two-phase"]


def test_the_score_counts_both_phases_and_the_switch():
    cfg = RecoveryConfig(horizon_s=600, transfer_Bps=1e7, background_Bps=2.5e6)
    cands = scored(ctx(), cfg)
    for p in (x for x in cands if x.kind == "two-phase"):
        s1, s2 = predict(p.plan), predict(p.then.plan)
        bg = rounds_s(p.then.transfers, lambda t: t.nbytes / 2.5e6)  # the rate limit
        assert p.background_s == pytest.approx(bg) and bg > 0
        assert p.predicted_transition_s == cfg.rebuild_s and p.predicted_step_s == s1
        useful = 600 - cfg.rebuild_s
        phase1 = bg + SWITCH_STEPS * s1
        expect = (phase1 / s1 + (useful - phase1 - cfg.switch_s) / s2) * PLAN.global_batch
        assert p.score == pytest.approx(expect)
        row = p.row()
        assert row["background_s"] == p.background_s and row["then"]["kind"] == "reparallelize"
    # a copy longer than the horizon is all phase one: reroute's work, never better
    slow = scored(ctx(), RecoveryConfig(horizon_s=600, background_Bps=1.0))
    rer = next(x for x in slow if x.kind == "reroute")
    assert max(x.score for x in slow if x.kind == "two-phase") <= rer.score


def test_it_wins_when_moving_state_is_long_and_loses_when_it_is_short():
    # 1 GB layers over 50 MB/s: a reparallelization stalls ~20 s per round; two-phase
    # trains through the copy at reroute's speed and then runs the faster plan
    slow_links = RecoveryConfig(horizon_s=600, transfer_Bps=5e7)
    cands = scored(ctx(layer_bytes=1e9), slow_links)
    best = choose(cands, slow_links)
    assert best.kind == "two-phase"
    repar = max((x for x in cands if x.kind == "reparallelize"), key=lambda x: x.score)
    assert best.score > repar.score and best.score > next(
        x for x in cands if x.kind == "reroute").score
    # small layers over fast links: the switch is dearer than the copy it saves
    fast = RecoveryConfig(horizon_s=600, transfer_Bps=5e9)
    assert choose(scored(ctx(layer_bytes=1e3), fast), fast).kind != "two-phase"


def test_receivers_hold_the_copied_state_beside_their_stage():
    mem = COST.memory
    c = ctx(layer_bytes=2e6)
    cands, _ = build_candidates(c, predict, two_phase=True, memory=mem)
    first = next(x for x in cands if x.kind == "reroute")
    per_rank = plan_memory(first.plan, mem)
    for p in (x for x in cands if x.kind == "two-phase"):
        totals = {r: m.total + p.shadow_bytes.get(r, 0.0) for r, m in per_rank.items()}
        assert p.peak_bytes == pytest.approx(max(totals.values())) and p.fits
    # a capacity the reroute and the later plans fit in, but not a receiver holding
    # copies (this context's layer state, 2 MB, dwarfs the tiny emulated layers' memory)
    top = max(m.total for m in per_rank.values())
    later = max(x.peak_bytes for x in cands if x.kind == "reparallelize")
    cap = max(top, later) + 1.0
    cands, dropped = build_candidates(c, predict, two_phase=True, memory=mem,
                                      capacity_bytes=cap)
    assert any(x.kind == "reroute" for x in cands)
    assert any(x.kind == "reparallelize" and x.transfers for x in cands)
    assert all(x.kind != "two-phase" for x in cands)
    assert "holding the copied state" in dropped["two-phase"]


def test_the_switch_moves_nothing_that_the_copy_brought():
    c = ctx()
    cands, _ = build_candidates(c, predict, two_phase=True)
    pair = next(x for x in cands if x.kind == "two-phase")
    # at the switch the old plan is the reroute plan; the copies are held beside it
    at_switch = RecoveryContext(pair.plan, c.members, 20, c.layer_bytes)
    assert transfers(at_switch, pair.then.plan)  # without them, layers would move
    held = {}
    for t in pair.then.transfers:
        held.setdefault(t.dst, set()).add(t.layer)
    extra = RecoveryContext(pair.plan, c.members, 20, c.layer_bytes,
                            held_extra={r: frozenset(ls) for r, ls in held.items()})
    assert transfers(extra, pair.then.plan) == []


def test_a_two_phase_candidate_round_trips():
    c = ctx()
    cands = scored(c, RecoveryConfig())
    pair = next(x for x in cands if x.kind == "two-phase")
    back = RecoveryCandidate.from_dict(pair.to_dict())
    assert back.then.plan == pair.then.plan and back.then.transfers == pair.then.transfers
    assert back.background_s == pair.background_s and back.shadow_bytes == pair.shadow_bytes
    assert back.background_transfers == pair.then.transfers
    assert RecoveryCandidate.from_dict(cands[0].to_dict()).then is None


def test_the_cluster_simulator_switches_after_the_copy_and_abandons_it_on_a_change():
    sim_cost = CostModel(emulated_profile(SimpleNamespace(num_layers=8, forward_ms=10,
                                                          backward_ms=20, dim=64)),
                         CostConfig(ranks_per_node=4))
    cluster = ClusterConfig(num_nodes=2, gpus_per_node=4, trace_node_gpus=1)  # 8 nodes
    tcfg = TransitionConfig(detect_s=0.1, agree_s=0.2, plan_s=0.3, rebuild_s=0.4,
                            transfer_Bps=1e4, restart_s=30.0, heartbeat_timeout_s=5.0,
                            checkpoint_write_Bps=1e6, checkpoint_load_Bps=1e6,
                            checkpoint_interval_s=None)

    def run(policy, events):
        return simulate_trace(policy, PLAN, sim_cost, events, cluster, tcfg,
                              SimConfig(duration_s=3000.0, horizon_s=600.0))

    lose = [*initial_nodes(8), TraceEvent(100.0, "remove", "node5")]
    two = run("two-phase", lose)
    assert two.kinds.get("two-phase") == 1 and two.kinds.get("switch") == 1
    (when,) = [t for t, what in two.events if what.startswith("=switch")]
    assert when > 100.0
    # a second change before the copy ends abandons it: no switch
    quick = run("two-phase", [*lose, TraceEvent(100.5, "add", "node5")])
    assert "switch" not in quick.kinds
    one = run("adaptive-one-phase", lose)
    assert "two-phase" not in one.kinds and math.isfinite(one.samples)

"""Trace `slow` lines in the cluster simulator: the adaptive policy finds them with the
live detector (planner.straggler) and re-plans with the live mitigation
(planner.mitigation); the other policies keep their plan (planner/cluster/slow.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from planner.cluster.bench import straggler_table
from planner.cluster.predict import Predictor
from planner.cluster.results import Segment
from planner.cluster.sim import ClusterConfig, SimConfig, TransitionConfig, simulate_trace
from planner.cluster.slow import detect
from planner.cluster.traces import TraceEvent, initial_nodes
from planner.cost import CostConfig, CostModel
from planner.mitigation import repartitioned, with_counts
from planner.plan import Plan
from planner.straggler import StragglerConfig
from profiler.synthetic import emulated_profile

CLUSTER = ClusterConfig(num_nodes=2, gpus_per_node=4, trace_node_gpus=1)
TRANS = TransitionConfig(checkpoint_interval_s=1e9)  # no checkpoint in the way
SLOW_AT, BACK_AT, END = 10.0, 70.0, 100.0
OTHERS = ("reroute", "reroute+bf", "reparallelize", "redundant", "restart", "drop-replica")


@pytest.fixture(scope="module")
def cost() -> CostModel:
    cfg = SimpleNamespace(num_layers=8, forward_ms=10.0, backward_ms=20.0, dim=64)
    return CostModel(emulated_profile(cfg), CostConfig(ranks_per_node=4))


def dp2_pp4() -> Plan:  # pipelines [0, 1, 2, 3] and [4, 5, 6, 7]
    return Plan.uniform(8, dp=2, pp=4, num_microbatches=8, microbatch_size=2)


def episode(factor: float = 3.0, until: float = BACK_AT) -> list[TraceEvent]:
    """node2 (rank 2: stage 3 of the first pipeline) slow from SLOW_AT until `until`."""
    return [*initial_nodes(8), TraceEvent(SLOW_AT, "slow", "node2", factor),
            TraceEvent(until, "slow", "node2", 1)]


def run(policy, cost, events, **sim):
    return simulate_trace(policy, dp2_pp4(), cost, events, CLUSTER, TRANS,
                          SimConfig(duration_s=END, horizon_s=600.0, **sim))


def test_mitigation_trains_more_and_goes_back(cost):
    cfg = StragglerConfig()
    on, off = run("adaptive", cost, episode()), run("adaptive", cost, episode(),
                                                    mitigate_stragglers=False)
    assert on.samples > off.samples * 1.05  # measurably more
    assert off.mitigations == off.replans_back == 0 and not off.detection_delay_s
    assert on.mitigations == 1 and on.replans_back == 1 and on.transitions == 0
    base = Predictor(cost, "closed-form", 1.0)
    slowed = base.slowed(dp2_pp4(), {2: 3.0})
    # the detector needs `persistence` of its window slow: 6 of 8 steps at the slowed time
    found = math.ceil(cfg.persistence * cfg.window)
    assert on.detection_delay_s == [pytest.approx(found * slowed)]
    # the slow rank keeps one layer (its neighbours take the rest) and its pipeline
    # trains fewer microbatches; its layers move back once the speed is back
    (t1, away), (t2, back) = [e for e in on.events if e[0] > 0]
    even, split = "[0, 2, 4, 6, 8]", "[0, 2, 4, 5, 8]"
    assert away == (f"~repartition+rebalance stages [{even}, {even}] -> [{split}, {even}], "
                    f"microbatches [4, 4] -> [3, 5]")
    assert back == (f"~repartition+rebalance stages [{split}, {even}] -> [{even}, {even}], "
                    f"microbatches [3, 5] -> [4, 4]")
    # better than the best microbatch split alone, as predicted
    rebalanced = base(with_counts(dp2_pp4(), [2, 6]))
    # cleared once the window's median is fast: more than half of it (the slow rank
    # holds other layers than its replica now: compared with its own baseline)
    cleared = cfg.window // 2 + 1
    mitigated = with_counts(repartitioned(dp2_pp4(), base.with_slowdown({2: 3.0}).cost), [3, 5])
    assert base(mitigated) < rebalanced
    assert on.clear_delay_s == [pytest.approx(cleared * base(mitigated))]
    stall = TRANS.agree_s + TRANS.plan_s + TRANS.rebuild_s  # and a layer moves, twice
    assert 2 * stall < on.mitigation_stall_s == on.stall_s < 2 * stall + 1e-3
    assert SLOW_AT + found * slowed < t1 < SLOW_AT + (found + 1) * slowed + stall
    assert BACK_AT < t2 < t1 + END
    last = [s for s in on.segments if s.what == "train"][-1]
    assert last.t0 >= t2 and last.samples_per_s == pytest.approx(on.ff_samples_per_s)
    assert on.slowed_s == pytest.approx(BACK_AT - SLOW_AT - stall, abs=2 * slowed)
    table = straggler_table({"results": [on, off]})
    assert "| adaptive | 0.02 | 1 |" in table


def test_other_policies_unaffected_by_the_flag(cost):
    for policy in OTHERS:
        on, off = run(policy, cost, episode()), run(policy, cost, episode(),
                                                    mitigate_stragglers=False)
        assert (on.samples, on.steps, on.stall_s, on.events, on.slowed_s) == \
            (off.samples, off.steps, off.stall_s, off.events, off.slowed_s), policy
        assert on.mitigations == 0 and not on.detection_delay_s and on.slowed_s > 0
    # without mitigation, adaptive keeps its plan through the slowdown like them
    plain = run("adaptive", cost, episode(), mitigate_stragglers=False)
    assert plain.samples == run("reparallelize", cost, episode()).samples


def test_what_the_detector_cannot_see_is_not_mitigated(cost):
    cfg = StragglerConfig()
    # under the threshold: never a straggler
    weak = run("adaptive", cost, episode(factor=1.5))
    assert weak.mitigations == 0 and not weak.detection_delay_s and weak.slowed_s > 0
    # shorter than the detection: over before the detector is sure
    step = Predictor(cost, "closed-form", 1.0).slowed(dp2_pp4(), {2: 3.0})
    blip = run("adaptive", cost, episode(until=SLOW_AT + 3 * step))
    assert blip.mitigations == 0 and not blip.detection_delay_s
    # the thresholds are the live runtime's StragglerConfig
    strict = run("adaptive", cost, episode(), straggler=StragglerConfig(threshold=3.5))
    assert strict.mitigations == 0 and not strict.detection_delay_s
    assert detect(cfg, dp2_pp4(), cost, {}, {2: 3.0}).steps == 6
    assert detect(cfg, dp2_pp4(), cost, {2: 3.0}, {}).steps == 5
    assert detect(cfg, dp2_pp4(), cost, {}, {2: 1.5}) is None


@pytest.mark.parametrize("lost", ["node5", "node2"])
def test_recovery_while_slow(cost, lost):
    """A loss during the slowdown: the recovery is the policy's own; a straggler still
    there is mitigated again on the new plan at once (the leader already knows it), and
    a lost straggler is forgotten (its replacement is not slow)."""
    events = sorted([*episode(), TraceEvent(30.0, "remove", lost)], key=lambda e: e.time_s)
    on, off = run("adaptive", cost, events), run("adaptive", cost, events,
                                                 mitigate_stragglers=False)
    assert on.transitions == off.transitions == 1
    if lost != "node2":  # else the slow rank's re-partitioned layers give other options
        assert on.kinds == off.kinds
    assert len(on.detection_delay_s) == 1
    kept = lost != "node2"
    assert on.mitigations == 1 + kept and on.replans_back == int(kept)
    after = [what for t, what in on.events if t >= 30.0]
    assert after[0].startswith("-")  # the recovery first
    if kept:
        assert after[1].startswith("~rebalance")
    else:
        assert len(after) == 1 and on.slowed_s < 30.0
    assert on.samples > off.samples


DROP = StragglerConfig(drop=True, park=False)  # off by default; parking would come first


def for_good(factor: float) -> list[TraceEvent]:
    """node2 (rank 2) slow from SLOW_AT to the end."""
    return [*initial_nodes(8), TraceEvent(SLOW_AT, "slow", "node2", factor)]


def last_train(result) -> Segment:
    return [s for s in result.segments if s.what == "train"][-1]


def test_a_far_slower_rank_is_dropped(cost):
    """20x slow for good: no in-place mitigation comes close to running without it, so
    rank 2 leaves (straggler.drop, as live under odyssey run) and the survivors run what
    a failure of rank 2 would get; with drop off it is worked around in place."""
    on = run("adaptive", cost, for_good(20.0), straggler=DROP)
    off = run("adaptive", cost, for_good(20.0), straggler=StragglerConfig(park=False))
    assert on.mitigations == on.drops == 1 and on.transitions == 0
    assert off.mitigations == 1 and off.drops == 0
    (t, what), = on.events
    assert what.startswith("~drop rank(s) [2] leave, then reparallelize"), what
    found = SLOW_AT + on.detection_delay_s[0]
    # the stall: the recovery's transition and the slowed step in flight it aborts
    slowed = Predictor(cost, "closed-form", 1.0).slowed(dp2_pp4(), {2: 20.0})
    assert slowed < t - found == pytest.approx(on.mitigation_stall_s, abs=slowed)
    # rank 2 is out of the plan afterwards: nothing slowed after the drop
    assert on.slowed_s < t - SLOW_AT
    assert off.slowed_s > END - t
    # the failure's own recovery: the rate a loss of node2 gets
    lost = run("adaptive", cost, [*initial_nodes(8), TraceEvent(SLOW_AT, "remove", "node2")])
    assert last_train(on).samples_per_s == pytest.approx(last_train(lost).samples_per_s)
    assert last_train(on).samples_per_s > 1.25 * last_train(off).samples_per_s
    assert on.samples > off.samples
    assert "1 mitigations (1 drops)" in on.notes[0]
    assert "| 1 (1) |" in straggler_table({"results": [on]})  # the drops column


def test_a_far_slower_rank_is_parked_and_rejoins_when_its_slowdown_ends(cost):
    """20x slow from SLOW_AT until 55 s, parking on (the default): rank 2 leaves the plan
    (the survivors reroute its stage through its replica), probes, and rejoins after its
    slowdown ends: a join recovery (the probes' time later) puts every rank back in the
    plan, and the job trains more than working around it in place or keeping the plan."""
    events = episode(20.0, until=55.0)
    on = run("adaptive", cost, events)
    inplace = run("adaptive", cost, events, straggler=StragglerConfig(park=False))
    keep = run("adaptive", cost, events, mitigate_stragglers=False)
    (t, park), (t2, back) = on.events
    assert park.startswith("~park rank(s) [2] parked"), park
    assert SLOW_AT < t < 55.0  # found within its window of (20x slow) steps
    cfg = StragglerConfig()
    probes = (cfg.window // 2 + 1) * cfg.probe_every_s  # the window's median turns
    assert t2 == pytest.approx(55.0 + probes) and back.startswith("+"), back  # a join
    assert sum(json.loads(back.split(" ", 1)[1])) == 8  # every rank in the plan again
    assert on.mitigations == 1 and on.drops == 0 and on.transitions == 1
    assert on.slowed_s < t - SLOW_AT + 1e-9  # out of the plan while slow
    assert on.samples > inplace.samples > keep.samples


def test_a_mildly_slow_rank_is_worked_around_in_place(cost):
    on = run("adaptive", cost, for_good(3.0), straggler=DROP)
    off = run("adaptive", cost, for_good(3.0))
    assert on.mitigations == 1 and on.drops == 0
    assert on.events[-1][1].startswith("~repartition+rebalance")
    assert (on.samples, on.events) == (off.samples, off.events)


def test_a_dropped_rank_stays_out_until_a_replacement_takes_its_slot(cost):
    """The dropped rank stays out when its slowdown ends (irreversible, its node still
    up); once its node is removed (no loss: it had left) a replacement in the slot joins
    as a normal, fast rank."""
    events = [*for_good(20.0), TraceEvent(55.0, "slow", "node2", 1),
              TraceEvent(65.0, "remove", "node2"), TraceEvent(75.0, "add", "node8")]
    r = run("adaptive", cost, events, straggler=DROP)
    (t, drop), (t2, back) = r.events
    assert drop.startswith("~drop") and t < 55.0
    assert t2 == 75.0 and back.startswith("+")  # an arrival; the removal was no loss
    assert sum(json.loads(back.split(" ", 1)[1])) == 8  # every rank in the plan again
    assert r.transitions == 1 and r.drops == 1 and len(r.detection_delay_s) == 1
    out = [s for s in r.segments if s.what == "train" and t <= s.t0 < t2]
    assert len(out) == 1 and out[0].t1 > 70.0  # one rate from the drop to the arrival
    rejoined = last_train(r)
    assert rejoined.t0 > t2 and rejoined.samples_per_s > out[0].samples_per_s
    assert r.slowed_s < t - SLOW_AT  # not slow after it rejoined

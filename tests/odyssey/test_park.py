"""Parking a straggler in a running job (ranks as threads): a rank many times slower
leaves the plan but stays in the job, its stage's work rerouted through its replica; it
probes its own speed, and once its slowdown is over it rejoins like a replacement worker
and takes its layers from live holders. The trajectory stays the failure-free one."""

from __future__ import annotations

import dataclasses
import json
from statistics import median

import pytest

from odyssey import contract
from odyssey.data import RandomRegression
from odyssey.emulate import EmulationConfig, build_emulated
from odyssey.hooks import CommittedStep, TrainerHook
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from odyssey.summary import summarize
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from planner.straggler import StragglerConfig
from tests.helpers import max_rel, reference, tiny_model
from tests.odyssey.test_straggler_mitigation import StepTimes

pytestmark = pytest.mark.slow  # jobs of 4 ranks as threads

EMU = EmulationConfig(num_layers=4, forward_ms=3, backward_ms=6)
FAST = StragglerConfig(window=4, probe_every_s=0.1)  # found and cleared in a few steps


class StatusSeen(TrainerHook):
    """The leader's live status record's stragglers, per committed step."""

    def __init__(self, store):
        self.store = store
        self.stragglers: dict[int, list[dict]] = {}

    def on_step_committed(self, c: CommittedStep) -> None:
        if c.leader and self.store.check([contract.STATUS_RECORD]):
            rec = json.loads(self.store.get(contract.STATUS_RECORD))
            self.stragglers[c.step] = rec["stragglers"]


def _events(run_dir, *kinds: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / contract.EVENTS_FILE) if e["kind"] in kinds]


def _check_park_and_rejoin(run_dir, rank: int) -> tuple[dict, dict]:
    """The park's re-plan and the rejoin's recovery, checked."""
    decisions = [e for e in _events(run_dir, "mitigation") if e["chosen"] != "keep"]
    assert [e["chosen"] for e in decisions] == ["park"], decisions
    best = min(decisions[0]["candidates"], key=lambda c: c["predicted_step_s"])
    assert best["kind"] == "park"  # the model's predicted best
    parked, rejoined = _events(run_dir, "recovery")
    assert (parked["cause"], parked["chosen"], parked["ranks_lost"]) == ("replan", "park", [])
    assert rank not in parked["members"] and parked["moved_bytes"] == 0
    assert all(rank != st["rank"] for p in parked["plan"]["pipelines"] for st in p["stages"])
    assert rejoined["cause"] == "join" and rejoined["newcomers"] == [rank]
    assert rejoined["members"] == [0, 1, 2, 3]
    assert rank in {st["rank"] for p in rejoined["plan"]["pipelines"] for st in p["stages"]}
    cleared = _events(run_dir, "straggler_cleared")
    assert [(e["rank"], e["reference"]) for e in cleared] == [(rank, "probe")], cleared
    assert cleared[0]["factor"] < min(FAST.clear_threshold * FAST.carried_tolerance,
                                      FAST.threshold / 1.1)
    return parked, rejoined


@pytest.mark.timeout(180)
def test_a_far_slower_rank_is_parked_and_rejoins(tmp_path):
    # emulated dp 2 x pp 2, 4 microbatches: rank 3 20x slower for steps 5..24
    cfg = job_config(mode="emulated", dp=2, pp=2, steps=45, num_microbatches=4,
                     microbatch_size=1, log_every=100, progress="off", run_dir=str(tmp_path),
                     inject=("slow:rank=3,step=5,factor=20,until=25",))
    cfg = dataclasses.replace(cfg, straggler=FAST)
    times = StepTimes()
    status: list[StatusSeen] = []

    def worker(w):
        if w.rank == 0:
            status.append(StatusSeen(w.store))
        return Trainer(build_emulated(EMU), RandomRegression(dim=EMU.dim), cfg, w,
                       hooks=[times, status[0]] if w.rank == 0 else []).fit()

    results = run_threads(4, worker, timeout_s=150)
    report = results[0].report
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    assert report["replicas_identical"] is True
    parked, rejoined = _check_park_and_rejoin(tmp_path, 3)
    assert parked["resume_step"] < 25 <= rejoined["resume_step"]  # back once fast
    # the parked rank trained no step meanwhile; it ran the rest after rejoining
    assert results[3].steps_run == parked["resume_step"] + 45 - rejoined["resume_step"]
    # measured (emulated compute, one run): the rerouted plan runs well faster than the
    # slowed one, and after the rejoin faster still
    g = {s: gen for s, (gen, _) in times.times.items()}
    t = {s: dt for s, (_, dt) in times.times.items()}
    slowed = median(t[s] for s in range(6, parked["resume_step"]) if g[s] == 0)
    rerouted = median(t[s] for s in range(parked["resume_step"] + 1, rejoined["resume_step"]))
    after = median(t[s] for s in range(rejoined["resume_step"] + 1, 45))
    assert rerouted < slowed / 2 and after < rerouted, (slowed, rerouted, after)
    # the live status lists it at every step it is out (what `odyssey status` and the
    # gauge show): parked, then, once its probe cleared it, rejoining until the join
    seen = status[0].stragglers
    out = [[(x["rank"], x["reference"]) for x in seen[s]]
           for s in range(parked["resume_step"] + 1, rejoined["resume_step"])]
    n_parked = out.count([(3, "parked")])
    assert n_parked > 0 and out == [[(3, "parked")]] * n_parked + [[(3, "rejoining")]] * (
        len(out) - n_parked), out
    assert seen[44] == []
    text = summarize(report)
    assert "park" in text and "probe" in text


@pytest.mark.timeout(240)
def test_real_compute_trajectory_is_exact_through_park_and_rejoin(tmp_path):
    # real compute, dp 2 x pp 2: rank 2 sleeps 59x its op time for steps 3..13 (60
    # steps: its probes need a few after that to clear it). 60x, not 20x: parking's
    # predicted step does not depend on the factor, working around it in place does, and
    # at 20x the threads' noisy profile put repartition+rebalance within 5% of park and
    # ahead once in about ten runs here
    cfg = job_config(dp=2, pp=2, steps=60, num_microbatches=4, microbatch_size=2,
                     log_every=100, progress="off", run_dir=str(tmp_path),
                     inject=("slow:rank=2,step=3,factor=60,until=14",))
    cfg = dataclasses.replace(cfg, straggler=FAST)

    def worker(w):
        model, data = tiny_model()
        return Trainer(model, data, cfg, w).fit()

    leader = run_threads(4, worker, timeout_s=200)[0]
    # ranks as threads share one interpreter: a short window may park ranks again, and a
    # last park may outlast the run; checked here: rank 2 is parked first, and the numbers
    decisions = [e for e in _events(tmp_path, "mitigation") if e["chosen"] != "keep"]
    assert decisions and decisions[0]["chosen"] == "park", decisions
    assert decisions[0]["stragglers"].keys() == {"2"}, decisions
    report = leader.report
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    assert report["replicas_identical"] is True
    ref, _ = reference(cfg)
    assert max(max_rel(leader.losses[k], ref[k]) for k in range(cfg.training.steps)) <= 1e-5

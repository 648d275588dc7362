"""Two-phase recovery with real processes and a real SIGKILL: reroute at once, copy a
reparallelized plan's state behind the training, switch when the copy is done.

The background copy is rate-limited (`--fault-tolerance.background-Bps`) so that it
spans several steps of the rerouted plan; the checks are the ones every recovery keeps
(trajectory within 1e-5 of the failure-free one, no sample lost or trained twice,
replicas identical, which the switch itself checks before training resumes), plus what
two-phase promises: nothing moves before training resumes, the switch moves nothing
either, and a failure during the copy is survived with the copy abandoned.
"""

import pytest

from planner.placement import RecoveryContext
from planner.plan import Plan
from planner.recovery import reroute
from tests.odyssey.test_fault_tolerance import TINY, check_same_numbers, recoveries, run_job

pytestmark = pytest.mark.slow  # each test runs an `odyssey run` job

STEPS = 20
# the background copy is rate-limited: 1 MB/s moves this model's 2 layers in ~0.16 s


def job(tmp_path, faults: list[str], rate: float = 1e6) -> dict:
    report, _ = run_job(tmp_path, 4, [
        "--dp", "2", "--pp", "2", "--steps", str(STEPS), "--num-microbatches", "4",
        "--microbatch-size", "2", "--ft-policy", "two-phase", *TINY,
        "--fault-tolerance.background-Bps", str(rate), "--inject", *faults])
    check_same_numbers(report, tmp_path / "run", STEPS)
    return report


@pytest.mark.timeout(200)
def test_two_phase_reroutes_at_once_then_switches_after_the_background_copy(tmp_path):
    report = job(tmp_path, ["kill:rank=3,step=3,phase=forward"])
    first, switch = recoveries(report)
    # phase one is the reroute plan, resumed with nothing moved
    initial = Plan.from_dict(report["initial_plan"])
    rerouted = reroute(RecoveryContext(initial, [0, 1, 2], 2, [0.0] * initial.num_layers))
    assert first["chosen"] == "two-phase" and first["ranks_lost"] == [3]
    assert Plan.from_dict(first["plan"]).to_dict() == rerouted.plan.to_dict()
    assert first["moved_bytes"] == 0 and first["transfer_rounds"] == 0
    behind = first["two_phase"]
    assert behind["then"] == "reparallelize" and behind["background_moved_bytes"] > 0
    # the switch: once every layer is copied, to the plan copied for, moving nothing
    assert switch["policy"] == "switch" and switch["cause"] == "switch"
    assert switch["chosen"] == "reparallelize" and switch["moved_bytes"] == 0
    assert [len(p["stages"]) for p in switch["plan"]["pipelines"]] == \
        behind["then_pipelines"]
    bg = switch["background"]
    # rate-limited: 162 KB at 1 MB/s cannot take less than ~0.1 s; the switch comes at
    # least one decision after the copy is done
    assert bg["measured_s"] >= 0.1 and bg["predicted_s"] > 0 and bg["steps"] >= 2, bg
    assert report["plan"] == switch["plan"]


@pytest.mark.timeout(200)
def test_a_failure_during_the_background_copy_is_survived(tmp_path):
    # rank 2 receives the copy (0.32 s at 0.5 MB/s); it dies two steps into it
    report = job(tmp_path, ["kill:rank=3,step=3,phase=forward",
                            "kill:rank=2,step=5,phase=backward"], rate=5e5)
    first, second, *rest = recoveries(report)
    assert first["chosen"] == "two-phase" and second["ranks_lost"] == [2]
    # no switch in between: the first copy was abandoned, the survivors re-planned from
    # the rerouted plan's own state
    assert second["generation"] == first["generation"] + 1 and second["cause"] == "failure"
    # (two-phase again, with a new copy; it may switch before the run ends)
    for switch in rest:
        assert switch["policy"] == "switch" and switch["moved_bytes"] == 0
        assert switch["background"]["started"] > first["time"]  # the new copy's
        assert [len(p["stages"]) for p in switch["plan"]["pipelines"]] == \
            second["two_phase"]["then_pipelines"]
    assert {s["rank"] for p in report["plan"]["pipelines"] for s in p["stages"]} == {0, 1}

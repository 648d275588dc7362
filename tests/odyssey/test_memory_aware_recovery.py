"""Memory-aware recovery with real processes: a device capacity that redundant compute
does not fit in. Without memory awareness the fixed redundant policy runs over budget;
with it, redundant is dropped (reason in the event) and the best plan that fits runs,
through a SIGKILL, on the failure-free trajectory."""

import pytest
import torch

from examples.gpt import build_gpt
from odyssey.online_profile import OnlineProfile
from planner.memory import MemoryModel
from planner.plan import Plan
from planner.recovery import RecoveryContext, build_candidates
from tests.helpers import TINY
from tests.odyssey.test_fault_tolerance import (
    STEPS,
    check_same_numbers,
    recoveries,
    run_job,
)
from tests.odyssey.test_fault_tolerance import TINY as TINY_ARGS

pytestmark = pytest.mark.slow  # starts `odyssey run` jobs

MB, M = 2, 4


def leader_memory_model() -> MemoryModel:
    """The memory model the leader builds for this job (online profile: parameter counts
    from the votes, the boundary activation per layer)."""
    model = build_gpt(TINY)
    online = OnlineProfile(model.num_layers)
    online.params = [sum(p.numel() for p in model.build_layer(i).parameters())
                     for i in range(model.num_layers)]
    spec = model.activation_spec(MB)
    act = float(torch.Size(spec.shape).numel() * spec.dtype.itemsize)
    return MemoryModel(online.to_profile(model.name, MB, act)), model.num_layers


def capacity_between_redundant_and_reroute() -> float:
    mem, layers = leader_memory_model()
    plan = Plan.uniform(layers, 2, 2, M, MB)
    ctx = RecoveryContext(plan, [0, 2, 3], STEPS, [1.0] * layers)
    cands, _ = build_candidates(ctx, memory=mem)
    peak = {c.kind: c.peak_bytes for c in cands if c.kind in ("redundant", "reroute")}
    assert peak["reroute"] < peak["redundant"]
    return (peak["reroute"] + peak["redundant"]) / 2


@pytest.mark.timeout(300)
def test_capacity_drops_redundant_compute_and_the_fitting_plan_keeps_the_trajectory(
        tmp_path):
    cap = int(capacity_between_redundant_and_reroute())
    base = ["--dp", "2", "--pp", "2", "--steps", str(STEPS), "--num-microbatches", str(M),
            "--microbatch-size", str(MB), "--ft-policy", "redundant", *TINY_ARGS,
            "--device-memory", str(cap), "--inject", "kill:rank=1,step=4,phase=backward"]
    # memory awareness off: the fixed policy's redundant plan runs, over the budget
    off, _ = run_job(tmp_path / "off", 4, [*base, "--fault-tolerance.no-memory-aware"])
    [ev] = recoveries(off)
    assert ev["chosen"] == "redundant"
    row = next(c for c in ev["candidates"] if c["kind"] == "redundant")
    assert row["fits"] is False and row["peak_bytes"] > cap
    check_same_numbers(off, tmp_path / "off" / "run")
    # on: redundant is dropped for memory; the choice falls back to what fits
    on, _ = run_job(tmp_path / "on", 4, base)
    [ev] = recoveries(on)
    assert "device memory" in ev["dropped"]["redundant"]
    assert ev["chosen"] != "redundant"
    assert all(c["fits"] and 0 < c["peak_bytes"] <= cap for c in ev["candidates"])
    check_same_numbers(on, tmp_path / "on" / "run")

"""Memory-aware recovery with real processes: a device capacity that redundant compute
does not fit in (set between the leader's own predicted peaks of reroute and redundant,
read from a probe run). Without memory awareness the fixed redundant policy runs over
budget; with it (swapping not priced), redundant is dropped (reason in the event) and
the best plan that fits runs, through a SIGKILL, on the failure-free trajectory."""

import pytest

from tests.odyssey.test_fault_tolerance import (
    STEPS,
    check_same_numbers,
    recoveries,
    run_job,
)
from tests.odyssey.test_fault_tolerance import TINY as TINY_ARGS

pytestmark = pytest.mark.slow  # starts `odyssey run` jobs

MB, M = 2, 4


@pytest.mark.timeout(300)
def test_capacity_drops_redundant_compute_and_the_fitting_plan_keeps_the_trajectory(
        tmp_path):
    common = ["--dp", "2", "--pp", "2", "--steps", str(STEPS), "--num-microbatches", str(M),
              "--microbatch-size", str(MB), "--ft-policy", "redundant", *TINY_ARGS,
              "--inject", "kill:rank=1,step=4,phase=backward"]
    # the leader's own predictions (measured saved bytes), with room to spare
    probe, _ = run_job(tmp_path / "probe", 4, [*common, "--device-memory", "64GiB"])
    [ev] = recoveries(probe)
    peak = {c["kind"]: c["peak_bytes"] for c in ev["candidates"]
            if c["kind"] in ("redundant", "reroute")}
    assert peak["reroute"] < peak["redundant"]
    cap = int((peak["reroute"] + peak["redundant"]) / 2)
    # swapping is not priced here (tests/odyssey/test_swap_to_fit.py is where it is)
    base = [*common, "--device-memory", str(cap), "--fault-tolerance.no-swap-to-fit"]
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

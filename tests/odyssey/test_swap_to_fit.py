"""Swap to fit, live: a recovery plan that fits only by swapping activations runs with
Chameleon on the ranks that need it, at the budget the planner computed, and Chameleon
turns off again when a later plan fits.

Real processes, real compute (a GPT whose saved tensors are over Chameleon's 64 KiB
minimum), a SIGKILL, the fixed redundant policy: rank 0 adopts the lost stage and holds
the whole model. A probe run with room to spare gives that plan's predicted peak and its
swap floor (the least capacity it fits in with swapping); the capacity is set between
them. Without memory awareness the plan runs over that capacity; with it, the planner
prices swapping, the ranks over budget run Chameleon at the computed budget (their peak
resident saved bytes, reported with every vote, stay within it); when the killed rank's
replacement joins, exactly the ranks the next plan gives a budget swap (the newcomer
included). Every run is on the failure-free trajectory (1e-5), lost = duplicated = 0,
replicas identical. Turning Chameleon off for a plan that fits: tests/odyssey/test_engine_swap.py.
"""

import pytest

from examples.gpt import GPTConfig, build_gpt
from odyssey.data import ArithmeticTokens, Sampler
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from odyssey.testing.reference import reference_run
from tests.helpers import max_rel
from tests.odyssey.test_fault_tolerance import recoveries, run_job

pytestmark = pytest.mark.slow  # starts `odyssey run` jobs

GPT = GPTConfig(vocab_size=64, seq_len=64, d_model=128, n_heads=4, n_blocks=2)
GPT_ARGS = ["--gpt-vocab-size", "64", "--gpt-seq-len", "64", "--gpt-d-model", "128",
            "--gpt-n-heads", "4", "--gpt-n-blocks", "2"]
MB, M, STEPS = 4, 4, 14


def base_args(steps: int = STEPS) -> list[str]:
    return ["--dp", "2", "--pp", "2", "--steps", str(steps), "--num-microbatches", str(M),
            "--microbatch-size", str(MB), "--ft-policy", "redundant", *GPT_ARGS,
            "--inject", "kill:rank=1,step=4,phase=backward"]


def check_exact(report: dict, run_dir, steps: int) -> None:
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(losses) == list(range(steps))
    cfg = job_config(steps=steps, num_microbatches=M, microbatch_size=MB)
    ref, _ = reference_run(build_gpt(GPT), ArithmeticTokens(GPT.vocab_size, GPT.seq_len),
                           Sampler(M, MB), steps, cfg.optimizer, total_steps=steps)
    worst = max(max_rel(losses[k], ref[k]) for k in range(steps))
    assert worst <= 1e-5, f"trajectory left the failure-free one: {worst:.2e}"
    s = report["samples"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["trained"] == s["expected"]
    assert report["replicas_identical"] is True


def outcomes(run_dir) -> dict[int, dict]:
    return {e["generation"]: e for e in read_jsonl(run_dir / "events.jsonl")
            if e["kind"] == "recovery_result"}


def redundant_row(event: dict) -> dict:
    return next(c for c in event["candidates"] if c["kind"] == "redundant")


def chosen_row(event: dict) -> dict:
    """The chosen candidate's row (the best score of the chosen kind)."""
    return max((c for c in event["candidates"] if c["kind"] == event["chosen"]),
               key=lambda c: c["score"])


@pytest.mark.timeout(420)
def test_a_plan_that_fits_only_by_swapping_runs_with_chameleon_at_its_budget(tmp_path):
    # probe: room to spare, so the plan fits and nothing swaps; its peak and floor
    probe, _ = run_job(tmp_path / "probe", 4, [*base_args(), "--device-memory", "64GiB"])
    [ev] = recoveries(probe)
    row = redundant_row(ev)
    assert ev["chosen"] == "redundant" and row["fits"] and row["swap_ranks"] == 0
    assert outcomes(tmp_path / "probe" / "run")[1]["swapping"] == {}
    assert 0 < row["floor_bytes"] < row["peak_bytes"]
    cap = int((row["floor_bytes"] + row["peak_bytes"]) / 2)

    # memory awareness off (before this project priced memory): runs over the capacity
    off, _ = run_job(tmp_path / "off", 4, [*base_args(), "--device-memory", str(cap),
                                           "--fault-tolerance.no-memory-aware"])
    [ev] = recoveries(off)
    row = redundant_row(ev)
    assert ev["chosen"] == "redundant" and not row["fits"] and row["peak_bytes"] > cap
    assert row["swap_ranks"] == 0
    assert outcomes(tmp_path / "off" / "run")[1]["swapping"] == {}
    check_exact(off, tmp_path / "off" / "run", STEPS)

    # on: swapping priced, Chameleon on at the computed budget; then a replacement joins,
    # the 4-rank plan fits, and swapping stops
    # (no straggler re-plans: while the replacement starts, 5 processes share 2 cores and a
    # rank can look 2x slow to the detector; a re-plan would add a generation here)
    steps = 100
    on, proc = run_job(tmp_path / "on", 4, [*base_args(steps), "--device-memory", str(cap),
                                            "--straggler.no-mitigate"],
                       ["--rejoin-after", "0.1"], timeout=400)
    events = recoveries(on)
    assert [e["cause"] for e in events] == ["failure", "join"], proc.stdout[-3000:]
    row = redundant_row(events[0])
    assert events[0]["chosen"] == "redundant" and not row["fits"] and row["swap_ranks"] >= 1
    assert "redundant" not in events[0]["dropped"]
    results = outcomes(tmp_path / "on" / "run")
    for gen, ev in enumerate(events, start=1):  # the ranks a plan gives a budget swap
        chosen = chosen_row(ev)
        swapping = results[gen]["swapping"]
        assert len(swapping) == chosen["swap_ranks"], (gen, swapping, chosen)
        for r, s in swapping.items():
            assert 0 < s["peak_resident"] <= s["budget"], (gen, r, s)
            assert s["copy_Bps"] > 0  # the lanes' bandwidth, measured while swapping
        assert results[gen]["predicted_step_s"] > 0 and results[gen]["measured_step_s"] > 0
    assert results[1]["swapping"]  # the first plan swaps
    # the first decision priced swapping at the leader's start-up calibration; the
    # join's at what the swapping ranks' lanes measured since (the median of their latest
    # figures: the EWMA moves on after the figures the outcome event kept)
    first, second = events[0]["swap_host_Bps"], events[1]["swap_host_Bps"]
    measured = sorted(s["copy_Bps"] for s in results[1]["swapping"].values())
    assert first > 0 and second != first
    assert measured[0] / 3 <= second <= measured[-1] * 3, (second, measured)
    check_exact(on, tmp_path / "on" / "run", steps)
    assert any(e["kind"] == "recovery_result" for e in on["events"])

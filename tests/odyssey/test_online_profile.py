"""The online profile (odyssey/online_profile.py): each layer's share of its stage's
time, measured by the engine layer by layer on CPU and sent with the vote, splits the
stage's time among its layers (evenly without shares), so a fresh recovery plan's split
by time sees which layers are heavy."""

from __future__ import annotations

from statistics import median

import pytest

from odyssey.data import RandomRegression
from odyssey.emulate import EmulationConfig, build_emulated
from odyssey.hooks import CommittedStep, TrainerHook
from odyssey.job_config import job_config
from odyssey.online_profile import OnlineProfile, stage_timing
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer


def test_shares_split_the_stage_time_among_its_layers():
    t = stage_timing({"forward": 0.08, "backward": 0.16}, 2, 4, 2, [10, 20],
                     layer_fwd_s=[0.01, 0.03])
    assert t["fwd_s"] == pytest.approx(0.02) and t["shares"] == pytest.approx([0.25, 0.75])
    prof = OnlineProfile(4, alpha=1.0)
    prof.observe(t)
    # the stage's 0.04 s forward per microbatch: 0.01 + 0.03; its backward split alike
    assert prof.fwd[2:] == pytest.approx([0.01, 0.03]) and prof.bwd[2:] == pytest.approx(
        [0.02, 0.06])
    even = OnlineProfile(4, alpha=1.0)
    even.observe(stage_timing({"forward": 0.08, "backward": 0.16}, 2, 4, 2, [10, 20]))
    assert "shares" not in stage_timing({"forward": 0.08}, 2, 4, 2, [1, 1], None, [0.0, 0.0])
    assert even.fwd[2:] == pytest.approx([0.02, 0.02])  # no shares: evenly


def test_a_step_folds_in_the_fastest_holder_of_each_layer():
    # replicas of layers 0..1 (one of them 10x slow, not found yet) and the stage 2..3:
    # the profile learns full speed, not a mix with the straggler
    fast = stage_timing({"forward": 0.04, "backward": 0.08}, 0, 2, 2, [1, 1])
    slow = stage_timing({"forward": 0.4, "backward": 0.8}, 0, 2, 2, [1, 1])
    other = stage_timing({"forward": 0.08, "backward": 0.16}, 2, 4, 2, [1, 1])
    prof = OnlineProfile(4, alpha=0.5)
    for order in ([slow, fast, other], [fast, slow, other]):
        prof.observe_step(order)
    assert prof.fwd == pytest.approx([0.01, 0.01, 0.02, 0.02])
    assert prof.bwd == pytest.approx([0.02, 0.02, 0.04, 0.04])


class Votes(TrainerHook):
    def __init__(self):
        self.timings: list[dict] = []

    def on_step_committed(self, step: CommittedStep) -> None:
        if step.votes is not None:
            self.timings += [v["timing"] for v in step.votes.values()]


@pytest.mark.timeout(120)
def test_the_engine_measures_each_layers_share(tmp_path):
    # emulated layers sleeping 2 / 8 / 2 / 8 ms: the votes' shares follow the sleeps
    cfg = job_config(mode="emulated", dp=1, pp=2, steps=4, num_microbatches=2,
                     microbatch_size=1, log_every=100, progress="off", run_dir=str(tmp_path))
    emu = EmulationConfig(num_layers=4, forward_ms=(2, 8, 2, 8), backward_ms=4)
    votes = Votes()

    def worker(w):
        return Trainer(build_emulated(emu), RandomRegression(dim=emu.dim), cfg, w,
                       hooks=[votes if w.rank == 0 else TrainerHook()]).fit()

    run_threads(2, worker, timeout_s=100)
    assert len(votes.timings) == 8
    for t in votes.timings:
        assert t["end"] - t["start"] == 2 and sum(t["shares"]) == pytest.approx(1.0)
    # 8 / (2 + 8) with per-call overheads (0.74-0.79 measured); the median, since a
    # preempted layer on a loaded machine can skew one step's shares
    heavy = median(t["shares"][1] for t in votes.timings)
    assert 0.6 < heavy < 0.9, votes.timings


def test_swap_pricing_takes_the_copy_bandwidth_measured_online():
    # the leader prices swapping at the start-up calibration until swapping ranks report
    # their lanes' bandwidth with their votes; then at the median of those
    from types import SimpleNamespace

    from odyssey.coordinator import Coordinator
    from planner.memory import SwapPricing

    base = SwapPricing(host_Bps=5e9, overlap=0.8, host_bytes=1e9)
    coord = SimpleNamespace(_start_pricing=base, _copy_bandwidth=lambda: None)
    assert Coordinator.swap_pricing.fget(coord) is base
    coord._copy_bandwidth = lambda: 2e9
    assert Coordinator.swap_pricing.fget(coord) == SwapPricing(2e9, 0.8, 1e9)
    coord._start_pricing = None  # swapping not priced at all: nothing to adjust
    assert Coordinator.swap_pricing.fget(coord) is None

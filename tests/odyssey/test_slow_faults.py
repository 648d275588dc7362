"""Persistent slowdowns (``slow:rank=R,step=S,factor=F[,until=U]``): the syntax and its
checks, the injector's per-step factor, and runs (ranks as threads, emulated and real
compute) where the slowed rank's own op timings rise by about the factor inside the range
and nowhere else, while the losses stay those of the failure-free reference."""

from __future__ import annotations

import json
import time

import pytest
from torch.distributed import HashStore

from odyssey import contract, emulate
from odyssey.data import RandomRegression
from odyssey.emulate import EmulationConfig, build_emulated
from odyssey.faults import FaultSpec
from odyssey.hooks import CommittedStep, TrainerHook
from odyssey.inject import FaultInjector
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from planner.program import Op
from tests.helpers import max_rel, reference, tiny_model


def test_persistent_slow_parses_and_round_trips():
    spec = FaultSpec.parse("slow:rank=1,step=5,factor=3,until=9")
    assert (spec.factor, spec.until, spec.persistent) == (3.0, 9, True)
    assert FaultSpec.parse(spec.to_text()) == spec
    forever = FaultSpec.parse("slow:rank=1,step=5,factor=2.5")
    assert forever.until is None and FaultSpec.parse(forever.to_text()) == forever
    # the one-off delay keeps its meaning and its text
    once = FaultSpec.parse("slow:rank=0,step=3,delay=1")
    assert not once.persistent and once.delay == 1.0
    assert once.to_text() == "slow:rank=0,step=3,phase=step,delay=1.0"


@pytest.mark.parametrize("text, message", [
    ("slow:rank=1,step=5,factor=0.5", "factor must be >= 1"),
    ("slow:rank=1,step=5,factor=nan", "factor must be >= 1"),
    ("slow:rank=1,step=5,factor=3,until=5", "until must be > step"),
    ("slow:rank=1,step=5,until=7", "until= needs factor="),
    ("kill:rank=1,step=5,factor=3", "factor= is for slow faults"),
    ("slow:rank=1,step=5,factor=2,delay=1", "not both"),
    ("slow:rank=1,step=5,factor=x", "could not convert"),
])
def test_bad_persistent_slow_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        FaultSpec.parse(text)


def test_compute_factor_covers_exactly_the_range():
    spec = FaultSpec.parse("slow:rank=0,step=2,factor=3,until=4")
    assert [spec.compute_factor(s) for s in range(6)] == [1, 1, 3, 3, 1, 1]
    assert FaultSpec.parse("slow:rank=0,step=2,factor=2").compute_factor(10**6) == 2
    assert FaultSpec.parse("slow:rank=0,step=2,delay=5").compute_factor(2) == 1


def test_injector_applies_slowdowns_from_launch_and_from_the_store():
    fired: list[FaultSpec] = []
    inj = FaultInjector([FaultSpec.parse("slow:rank=1,step=2,factor=2,until=4"),
                         FaultSpec.parse("slow:rank=0,step=0,factor=9")], 1,
                        on_fire=fired.append, token=None)
    assert [inj.compute_factor(s) for s in range(5)] == [1, 1, 2, 2, 1]
    store = HashStore()
    for text in ("slow:rank=1,step=-1,factor=3", "slow:rank=1,step=-1,factor=5,until=1"):
        key = contract.inject_key(store.add(contract.INJECT_COUNT, 1) - 1)
        store.set(key, text)
    inj.poll(store, next_step=3)  # the second one ends before step 3: ignored
    assert [inj.compute_factor(s) for s in range(2, 6)] == [2, 6, 3, 3]
    with inj.slowed(3):
        pass
    assert len(fired) == 2  # each slowdown reported once, when it starts
    with inj.slowed(3):
        pass
    assert len(fired) == 2


def test_real_compute_sleeps_in_proportion_inside_the_op():
    inj = FaultInjector([FaultSpec.parse("slow:rank=0,step=1,factor=3")], 0, token=None)
    t = time.perf_counter()
    with inj.slowed(1):
        inj.after_op(1, Op.FORWARD, 0.02)  # sleeps 2 x 20 ms
        inj.after_op(1, Op.ALLREDUCE, 0.5)  # communication is not slowed
    assert 0.035 < time.perf_counter() - t < 0.3
    t = time.perf_counter()
    inj.after_op(1, Op.FORWARD, 0.5)  # outside a step: nothing
    assert time.perf_counter() - t < 0.05


def test_emulated_compute_scales_the_layer_sleeps():
    inj = FaultInjector([FaultSpec.parse("slow:rank=0,step=1,factor=4")], 0, token=None,
                        emulated=True)
    t = time.perf_counter()
    with inj.slowed(1):
        emulate._sleep(0.01)
        inj.after_op(1, Op.FORWARD, 0.5)  # emulated: the sleep was scaled instead
    assert 0.035 < time.perf_counter() - t < 0.3


class VoteTimes(TrainerHook):
    """The leader's view of each rank's compute seconds per step (from the votes)."""

    def __init__(self):
        self.compute: dict[int, dict[int, float]] = {}

    def on_step_committed(self, step: CommittedStep) -> None:
        if step.votes is not None:
            self.compute[step.step] = {
                r: (v["timing"]["fwd_s"] + v["timing"]["bwd_s"]) for r, v in step.votes.items()}


def _ratios(times: VoteTimes, steps, slow: int, fast: int) -> list[float]:
    return sorted(times.compute[s][slow] / times.compute[s][fast] for s in steps)


@pytest.mark.slow  # ~2-3 s of emulated steps
@pytest.mark.timeout(120)
def test_emulated_slow_rank_is_slower_by_about_the_factor(tmp_path):
    # dp 2: ranks 0 and 1 hold the same layers, so their compute is compared side by side
    cfg = job_config(mode="emulated", dp=2, pp=1, steps=8, num_microbatches=2,
                     microbatch_size=1, log_every=100, progress="off", run_dir=str(tmp_path),
                     inject=("slow:rank=1,step=3,factor=3,until=6",))
    emu = EmulationConfig(num_layers=2, forward_ms=4, backward_ms=8)
    hooks = {0: VoteTimes()}

    def worker(w):
        return Trainer(build_emulated(emu), RandomRegression(dim=emu.dim), cfg, w,
                       hooks=[hooks.get(w.rank, TrainerHook())]).fit()

    run_threads(2, worker, timeout_s=120)
    times = hooks[0]
    slowed = _ratios(times, range(3, 6), slow=1, fast=0)
    normal = _ratios(times, [0, 1, 2, 6, 7], slow=1, fast=0)
    assert slowed[0] > 2.0, slowed  # ~3
    assert normal[len(normal) // 2] < 1.5, normal  # ~1
    # the whole job waits for it at the all-reduce: its step time rises too
    step_s = {m["step"]: m["step_time_s"] for m in read_jsonl(tmp_path / contract.METRICS_FILE)}
    assert min(step_s[s] for s in range(3, 6)) > 1.5 * max(step_s[s] for s in (1, 2, 6, 7))


def test_real_slow_rank_is_slower_and_the_numbers_unchanged(tmp_path):
    steps = 8
    cfg = job_config(dp=2, pp=1, steps=steps, num_microbatches=4, microbatch_size=2,
                     log_every=100, progress="off", run_dir=str(tmp_path),
                     inject=("slow:rank=0,step=2,factor=3",))
    hooks = {0: VoteTimes()}

    def worker(w):
        model, data = tiny_model()
        return Trainer(model, data, cfg, w, hooks=[hooks.get(w.rank, TrainerHook())]).fit()

    leader = run_threads(2, worker, timeout_s=120)[0]
    slowed = _ratios(hooks[0], range(2, steps), slow=0, fast=1)
    assert slowed[len(slowed) // 2] > 1.5, slowed  # ~3 (noisy: real compute on 2 cores)
    ref, _ = reference(cfg)
    assert max(max_rel(leader.losses[k], ref[k]) for k in range(steps)) <= 1e-5


def _events(run_dir, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / contract.EVENTS_FILE) if e["kind"] == kind]


@pytest.mark.slow  # ~2-3 s of emulated steps
@pytest.mark.timeout(120)
def test_straggler_found_and_cleared_in_a_run(tmp_path):
    # emulated, dp 2 x pp 2: rank 3 (stage 1 of pipeline 1) is 3x slower for steps 5..19;
    # rank 0 has a one-off 0.3 s hiccup at step 3 (never a straggler)
    cfg = job_config(mode="emulated", dp=2, pp=2, steps=30, num_microbatches=2,
                     microbatch_size=1, log_every=100, progress="off", run_dir=str(tmp_path),
                     inject=("slow:rank=3,step=5,factor=3,until=20",
                             "slow:rank=0,step=3,phase=forward,delay=0.3"))
    emu = EmulationConfig(num_layers=4, forward_ms=3, backward_ms=6)

    def worker(w):
        return Trainer(build_emulated(emu), RandomRegression(dim=emu.dim), cfg, w).fit()

    run_threads(4, worker, timeout_s=120)
    found, cleared = _events(tmp_path, "straggler"), _events(tmp_path, "straggler_cleared")
    assert [(e["rank"], e["since_step"], e["reference"]) for e in found] == [
        (3, 5, "replicas")], found
    window = cfg.straggler.window
    assert found[0]["step"] <= 5 + window and found[0]["factor"] > 2.0
    assert [e["rank"] for e in cleared] == [3] and 20 <= cleared[0]["step"] <= 20 + window
    report = json.loads((tmp_path / contract.REPORT_FILE).read_text())
    assert {e["kind"] for e in report["events"]} >= {"straggler", "straggler_cleared"}
    assert json.loads((tmp_path / contract.STATUS_FILE).read_text())["stragglers"] == []


def test_no_straggler_in_a_failure_free_run(tmp_path):
    # real compute, ranks as threads sharing one interpreter (the noisiest timing there is)
    cfg = job_config(dp=2, pp=2, steps=30, num_microbatches=4, microbatch_size=2,
                     log_every=100, progress="off", run_dir=str(tmp_path))

    def worker(w):
        model, data = tiny_model()
        return Trainer(model, data, cfg, w).fit()

    run_threads(4, worker, timeout_s=120)
    assert _events(tmp_path, "straggler") == []

"""Serving profile: interpolation, file validation, and a real (tiny) measurement."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from profiler.serving import ServingProfile, ServingProfileError, interp1


def linear_profile(**over) -> ServingProfile:
    """A profile whose tables are exact linear functions (so interpolation is checkable):
    dense = 1e-3 + 1e-5 T, prefill = 2e-6 p, decode = 1e-4 B + 1e-6 (B L), head = 1e-5 S."""
    db, dk = [1, 2, 4, 8, 16, 32], [16, 64, 256]
    d = dict(
        model={"vocab_size": 64, "context": 512, "d_model": 64, "n_heads": 4, "n_blocks": 2},
        device={"device": "synthetic"}, kv_bytes_per_token=2 * 2 * 64 * 4.0,
        param_bytes=1e6,
        dense_tokens=[1, 8, 64, 512], dense_s=[1e-3 + 1e-5 * t for t in (1, 8, 64, 512)],
        prefill_lens=[1, 64, 512], prefill_attn_s=[2e-6 * p for p in (1, 64, 512)],
        decode_batch=db, decode_kv=dk,
        decode_step_s=[[1e-4 * b + 1e-6 * b * k for k in dk] for b in db],
        head_rows=[1, 32], head_s=[1e-5, 32e-5])
    d.update(over)
    return ServingProfile(**d).check()


def test_interp1_points_segments_and_limits():
    xs, ys = [1, 4, 10], [2.0, 8.0, 9.0]
    assert interp1(xs, ys, 4) == 8.0
    assert interp1(xs, ys, 2.5) == pytest.approx(5.0)
    assert interp1(xs, ys, 7) == pytest.approx(8.5)
    assert interp1(xs, ys, 0) == 0.0
    assert interp1(xs, ys, 12) == pytest.approx(9 + 2 / 6)  # last segment extrapolated
    with pytest.raises(ServingProfileError, match="far outside the measured range"):
        interp1(xs, ys, 16)
    with pytest.raises(ServingProfileError, match="negative"):
        interp1(xs, ys, -1)


def test_lookups_reproduce_linear_tables_between_points():
    p = linear_profile()
    assert p.dense(100) == pytest.approx(1e-3 + 1e-5 * 100)
    assert p.prefill_attn(300) == pytest.approx(2e-6 * 300)
    # decode by batch size and total KV: 3 requests holding 300 tokens together
    assert p.decode_step(3, 300) == pytest.approx(1e-4 * 3 + 1e-6 * 300)
    assert p.decode_step(12, 12 * 100) == pytest.approx(1e-4 * 12 + 1e-6 * 1200)
    assert p.decode_step(0, 0) == 0.0
    with pytest.raises(ServingProfileError, match="decode_step"):
        p.decode_step(2, 2 * 4000)


def test_round_trip_and_malformed_files(tmp_path):
    p = linear_profile()
    path = tmp_path / "sp.json"
    p.save(path)
    assert ServingProfile.load(path) == p
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ServingProfileError, match="not valid JSON"):
        ServingProfile.load(bad)
    d = asdict(p)
    d["version"] = 99
    bad.write_text(json.dumps(d))
    with pytest.raises(ServingProfileError, match="version 99"):
        ServingProfile.load(bad)
    d = asdict(p)
    d["dense_s"] = d["dense_s"][:-1]
    bad.write_text(json.dumps(d))
    with pytest.raises(ServingProfileError, match="dense_s has 3 values for 4"):
        ServingProfile.load(bad)
    d = asdict(p)
    d["decode_kv"] = [64, 16, 256]
    del d["head_s"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ServingProfileError, match="malformed"):
        ServingProfile.load(bad)
    d["head_s"] = [1e-5, 2e-5]
    bad.write_text(json.dumps(d))
    with pytest.raises(ServingProfileError, match="decode_kv .* ascending"):
        ServingProfile.load(bad)
    with pytest.raises(ServingProfileError, match="cannot read"):
        ServingProfile.load(tmp_path / "missing.json")
    d = asdict(p)
    d["wake_s"] = -1e-3
    bad.write_text(json.dumps(d))
    with pytest.raises(ServingProfileError, match="wake_s must be >= 0"):
        ServingProfile.load(bad)
    del d["wake_s"]  # a profile written before wake_s was measured: no wake cost
    bad.write_text(json.dumps(d))
    assert ServingProfile.load(bad).wake_s == 0.0


def test_median_profile_takes_the_median_wake():
    from profiler.serving import median_profile

    ps = [linear_profile(wake_s=w) for w in (3e-3, 1e-3, 2e-3)]
    assert median_profile(ps).wake_s == 2e-3


def test_measured_profile_of_a_tiny_gpt():
    """Real timing of the real model (small grids): a valid profile whose KV bytes match
    the cache layout and whose estimate of a whole iteration is in the right range."""
    torch = pytest.importorskip("torch")
    from examples.gpt_kv import KVCacheGPT, ServeModelConfig
    from profiler.serving_profiler import (
        ServingProfilerConfig,
        profile_serving,
        time_batch,
        time_median,
    )
    from profiler.timing import TimingConfig

    torch.set_num_threads(1)
    cfg = ServeModelConfig(vocab_size=64, context=128, d_model=64, n_heads=4, n_blocks=2)
    model = KVCacheGPT(cfg, max_slots=12)
    pc = ServingProfilerConfig(dense_tokens=(1, 4, 16, 64), prefill_lens=(1, 16, 64),
                               decode_batch=(1, 2, 4, 8), decode_kv=(16, 64, 127),
                               head_rows=(1, 4, 8, 16), calibration_batches=2, rounds=1,
                               timing=TimingConfig(warmup=1, repeats=3))
    prof = profile_serving(model, pc)
    assert prof.kv_bytes_per_token == 2 * 2 * 64 * 4  # blocks x (k, v) x d_model x fp32
    assert prof.param_bytes == model.param_bytes
    assert all(v > 0 for v in prof.dense_s + prof.prefill_attn_s + prof.head_s)
    assert prof.overhead_s >= 0 and prof.overhead_per_request_s >= 0
    assert prof.wake_s >= 0
    # bigger work costs more (the 64-token dense pass does 64x the FLOPs of one token)
    assert prof.dense(64) > prof.dense(1)
    assert prof.decode_step(8, 8 * 127) > prof.decode_step(1, 16) > 0
    # a whole iteration, measured vs estimated: loose bound (shared CPU), but not vacuous
    gen = torch.Generator().manual_seed(3)

    def tokens(n):
        return torch.randint(0, 64, (n,), generator=gen)

    measured = time_batch(model, [40], [30, 70, 100], tokens,
                          lambda fn: time_median(fn, TimingConfig(1, 5)))
    from planner.serving.estimator import ServingCostModel

    predicted = ServingCostModel(prof).iteration_from_shape([40], [30, 70, 100])
    assert 0.4 < predicted / measured < 2.5, (predicted, measured)


def test_wake_pairs_time_real_idle_then_iterate():
    """Real idle-then-iterate pairs on both clocks (one difference per sample), every
    cache slot returned afterwards; wake_idle_s=0 skips the calibration."""
    torch = pytest.importorskip("torch")
    from examples.gpt_kv import KVCacheGPT, ServeModelConfig
    from profiler.serving_profiler import ServingProfilerConfig, _calibrate_wake, wake_pairs

    torch.set_num_threads(1)
    model = KVCacheGPT(ServeModelConfig(vocab_size=64, context=128, d_model=64, n_heads=4,
                                        n_blocks=2), max_slots=4)
    gen = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, 64, (n,), generator=gen)

    for clock in ("wall", "thread"):
        diffs = wake_pairs(model, [16, 8], [20], tokens, 0.01, 3, clock)
        assert len(diffs) == 3 and all(isinstance(x, float) for x in diffs)
        assert not model.caches and len(model.free_slots) == 4
    prof = linear_profile(wake_s=5e-3)
    _calibrate_wake(prof, model, ServingProfilerConfig(wake_idle_s=0), tokens)
    assert prof.wake_s == 5e-3  # skipped: left as it was

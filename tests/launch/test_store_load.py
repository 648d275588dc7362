"""The control-plane load generator (benchmarks/store_load.py), tiny and bounded."""

import pytest

from benchmarks.store_load import measure


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("plane", ["poll", "notify"])
def test_load_generator_reports_rates_latency_and_agreement(plane):
    r = measure(6, plane, seconds=1.0, procs=2, step_s=0.25)
    assert r["ranks"] == 6 and r["plane"] == plane
    assert r["requests_per_s"] > 6 * 5  # at least the heartbeats
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    # every simulated rank saw the notice and then the agreed membership
    assert r["notice_to_all_seen_ms"] is not None and r["notice_to_all_agreed_ms"] is not None
    assert r["notice_to_all_agreed_ms"] >= r["notice_to_all_seen_ms"]

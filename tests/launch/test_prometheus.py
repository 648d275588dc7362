"""The Prometheus series made from status records (launch/prometheus.py): gauges follow
the newest record, counters and histograms count each recovery once."""

from __future__ import annotations

import math

import pytest

from launch import prometheus

pytestmark = pytest.mark.skipif(not prometheus.available(),
                                reason="prometheus_client (the `prom` extra) not installed")


def _value(metrics, name: str, labels: dict | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_series_follow_the_records():
    m = prometheus.JobMetrics()
    m.update({"step": 4, "steps_per_s": 2.0, "samples_per_s": 16.0, "generation": 0,
              "members": [{"rank": r} for r in range(4)], "recovery_counts": [],
              "recoveries": [], "stragglers": [], "fenced": [], "checkpoint": None,
              "time": 1.0, "state": "training"})
    assert _value(m, "odyssey_step") == 4 and _value(m, "odyssey_alive_ranks") == 4
    assert math.isnan(_value(m, "odyssey_checkpoint_age_seconds"))  # no checkpoint yet
    recovery = {"generation": 1, "cause": "failure", "chosen": "reroute", "mttr_s": None}
    rec = {"step": 9, "generation": 1, "members": [{"rank": r} for r in range(3)],
           "recovery_counts": [{"kind": "reroute", "cause": "failure", "count": 1}],
           "recoveries": [recovery], "stragglers": [{"rank": 2, "factor": 3.0}],
           "fenced": [], "checkpoint": {"step": 8, "time": 1.0}, "time": 2.0,
           "state": "training"}
    m.update(rec)
    labels = {"kind": "reroute", "cause": "failure"}
    assert _value(m, "odyssey_recoveries_total", labels) == 1
    assert _value(m, "odyssey_mttr_seconds_count") == 0  # MTTR not known yet
    assert _value(m, "odyssey_straggler_factor", {"rank": "2"}) == 3.0
    m.update({**rec, "recoveries": [{**recovery, "mttr_s": 0.2, "detect_s": 0.05}],
              "stragglers": []})
    m.update({**rec, "recoveries": [{**recovery, "mttr_s": 0.2, "detect_s": 0.05}]})
    assert _value(m, "odyssey_recoveries_total", labels) == 1  # the same recovery
    assert _value(m, "odyssey_mttr_seconds_count") == 1
    assert _value(m, "odyssey_mttr_seconds_sum") == pytest.approx(0.2)
    assert _value(m, "odyssey_detection_delay_seconds_sum") == pytest.approx(0.05)
    assert _value(m, "odyssey_generation") == 1 and _value(m, "odyssey_checkpoint_step") == 8
    assert _value(m, "odyssey_checkpoint_age_seconds") > 0
    m.update({**rec, "recovery_counts": [{"kind": "reroute", "cause": "failure", "count": 3}],
              "state": "finished"})
    assert _value(m, "odyssey_recoveries_total", labels) == 3
    assert _value(m, "odyssey_job_finished") == 1

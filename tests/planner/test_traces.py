"""Trace parsing and synthetic traces (planner/cluster/traces.py)."""

from __future__ import annotations

import pytest

from planner.cluster.traces import (
    TraceError,
    TraceEvent,
    format_trace,
    load_trace,
    mean_gap_s,
    parse_trace,
    poisson_trace,
    straggler_trace,
)


def test_parse_bamboo_oobleck_format(tmp_path):
    text = "0,add,node1\n0,add,node2\n# comment\n\n3600000,remove,node2\n7200000,add,node3\n"
    ev = parse_trace(text)
    assert ev == [TraceEvent(0.0, "add", "node1"), TraceEvent(0.0, "add", "node2"),
                  TraceEvent(3600.0, "remove", "node2"), TraceEvent(7200.0, "add", "node3")]
    p = tmp_path / "t.csv"
    p.write_text(format_trace(ev))
    assert load_trace(p) == ev
    assert mean_gap_s(ev) == 3600.0


def test_slow_events_round_trip():
    ev = parse_trace("0,add,node0\n5000,slow,node0,2.5\n9000,slow,node0,1\n")
    assert ev[1] == TraceEvent(5.0, "slow", "node0", 2.5)
    assert parse_trace(format_trace(ev)) == ev


@pytest.mark.parametrize("line, words", [
    ("abc,add,node1", "not a number"),
    ("10,crash,node1", "unknown event 'crash'"),
    ("10,add,gpu1", "not of the form nodeN"),
    ("10,add", "got 2 fields"),
    ("-5,add,node1", "negative time"),
    ("10,slow,node1", "needs a FACTOR"),
    ("10,slow,node1,0.5", "must be >= 1"),
    ("10,add,node1,3", "only 'slow' events"),
])
def test_malformed_lines_name_the_line(line, words):
    with pytest.raises(TraceError) as e:
        parse_trace(f"0,add,node0\n{line}\n", "mytrace.csv")
    assert "mytrace.csv:2" in str(e.value) and words in str(e.value)


def test_missing_file():
    with pytest.raises(TraceError, match="does not exist"):
        load_trace("/nonexistent/trace.csv")


def test_poisson_trace_rate_and_repairs():
    nodes, days, mtbf, repair = 50, 30, 5 * 86400.0, 3600.0
    ev = poisson_trace(nodes, days * 86400, mtbf, repair, seed=3)
    removes = [e for e in ev if e.kind == "remove"]
    # expected failures ~ nodes * duration / (mtbf + repair) = 299; Poisson sd ~ 17
    assert 230 < len(removes) < 370
    up: set[str] = set()
    for e in ev:  # a node is only removed when up, re-added when down, after `repair`
        if e.kind == "add":
            assert e.node not in up
            up.add(e.node)
        else:
            assert e.node in up
            up.discard(e.node)
    first = {}
    for e in ev:
        if e.kind == "remove":
            first[e.node] = e.time_s
        elif e.time_s > 0:
            assert e.time_s == pytest.approx(first[e.node] + repair)
    assert ev == poisson_trace(nodes, days * 86400, mtbf, repair, seed=3)


def test_straggler_episodes_end():
    ev = straggler_trace(4, 86400, 3600, 600, 3.0, seed=1)
    assert ev and all(e.kind == "slow" for e in ev)
    starts = [e for e in ev if e.factor == 3.0]
    ends = [e for e in ev if e.factor == 1.0]
    assert len(starts) - len(ends) in (0, 1)
    for a, b in zip(starts, ends):
        assert b.node == a.node and b.time_s == pytest.approx(a.time_s + 600)


def test_bad_synthetic_arguments():
    with pytest.raises(TraceError):
        poisson_trace(0, 100, 10, 1)
    with pytest.raises(TraceError):
        straggler_trace(2, 100, 10, 5, 0.5)

"""Trace -> live-job injections (launch/replay_trace.py) and the validation benchmark's
trace and phase split (planner/cluster/validation.py, used by benchmarks/sim_vs_runtime.py)."""

from __future__ import annotations

import json

import pytest

from launch.replay_trace import Injection, main, plan_injections
from planner.cluster.traces import TraceError, TraceEvent, initial_nodes, parse_trace
from planner.cluster.validation import (
    DEFAULT_TRACE,
    WORLD,
    default_trace,
    phase_bounds,
    rank_order_mismatches,
)
from tests.helpers import odyssey_in_background


def test_removes_kill_the_nodes_rank_and_adds_get_fresh_ranks():
    text = ("0,add,node0\n0,add,node1\n0,add,node2\n0,add,node3\n"
            "5000,remove,node2\n9000,remove,node1\n12000,add,node2\n"
            "15000,remove,node2\n20000,add,node1\n21000,add,node2\n")
    inj = plan_injections(parse_trace(text), 4)
    assert inj == [Injection(5.0, "kill", "node2", 2), Injection(9.0, "kill", "node1", 1),
                   Injection(12.0, "rejoin", "node2", 4),
                   # node2 is lost again: its replacement's rank is the one killed
                   Injection(15.0, "kill", "node2", 4),
                   Injection(20.0, "rejoin", "node1", 5), Injection(21.0, "rejoin", "node2", 6)]
    assert inj[2].argv("R") == ["--run-dir", "R", "--kind", "rejoin"]
    assert inj[3].argv("R", "step") == ["--run-dir", "R", "--kind", "kill", "--rank", "4",
                                        "--phase", "step"]


def test_no_initial_adds_means_all_nodes_up():
    inj = plan_injections([TraceEvent(1.0, "remove", "node7")], 8)
    assert inj == [Injection(1.0, "kill", "node7", 7)]


@pytest.mark.parametrize("text,match", [
    ("0,add,node0\n0,add,node1\n1000,remove,node5\n", "not up"),
    ("0,add,node0\n0,add,node1\n1000,add,node1\n", "already up"),
    ("0,add,node0\n0,add,node2\n", "exactly node0..node1"),
    ("0,add,node0\n0,add,node1\n0,add,node1\n", "exactly node0..node1"),
    ("0,add,node0\n0,add,node1\n1000,slow,node1,2\n", "fail-slow"),
    ("0,add,node0\n0,add,node1\n1000,remove,node0\n2000,remove,node1\n", "leave no rank"),
])
def test_traces_the_job_cannot_follow_are_refused(text, match):
    with pytest.raises(TraceError, match=match):
        plan_injections(parse_trace(text), 2)


def test_cli_reports_a_bad_trace(tmp_path, capsys):
    p = tmp_path / "t.csv"
    p.write_text("0,add,node0\n1000,remove,node3\n")
    assert main(["--run-dir", str(tmp_path), "--trace", str(p), "--world-size", "1"]) == 2
    assert "not up" in capsys.readouterr().err


def test_default_benchmark_trace_keeps_rank_order():
    inj = plan_injections(default_trace(), WORLD)
    assert [i.kind for i in inj] == ["kill", "kill", "rejoin", "kill", "rejoin"]
    assert len(inj) == len(DEFAULT_TRACE)
    assert rank_order_mismatches(default_trace(), inj) == []
    assert plan_injections(initial_nodes(WORLD), WORLD) == []


def test_rank_order_mismatch_is_detected():
    # node5 returns into slot 2 (the lowest free) in the simulator but as rank 8 live:
    # node3 is then 4th in the simulator's rank order and 3rd in the runtime's.
    events = [*initial_nodes(WORLD), TraceEvent(6.0, "remove", "node5"),
              TraceEvent(18.0, "remove", "node2"), TraceEvent(30.0, "add", "node5"),
              TraceEvent(44.0, "remove", "node3")]
    msgs = rank_order_mismatches(events, plan_injections(events, WORLD))
    assert msgs == ["t=44.0s node3: place 3 in the simulator's rank order, 2 in the runtime's"]


def test_phase_bounds_split_at_applied_events():
    applied = [{"kind": "kill", "node": "node5", "applied_s": 6.2},
               {"kind": "rejoin", "node": "node5", "applied_s": None},  # never noticed
               {"kind": "kill", "node": "node2", "applied_s": 18.1},
               {"kind": "rejoin", "node": "node9", "applied_s": 18.1}]
    assert phase_bounds(applied, 40.0) == [("start", 0.0, 6.2), ("-node5", 6.2, 18.1),
                                           ("-node2 +node9", 18.1, 40.0)]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_replay_a_trace_into_a_live_job(tmp_path):
    """3 real ranks (emulated compute): node1 lost at 1 s, back at 2 s (as rank 3)."""
    trace = tmp_path / "trace.csv"
    trace.write_text("0,add,node0\n0,add,node1\n0,add,node2\n1000,remove,node1\n"
                     "2000,add,node1\n")
    run_dir = tmp_path / "run"
    args = ["--mode", "emulated", "--dp", "3", "--steps", "300", "--num-microbatches", "3",
            "--microbatch-size", "1", "--emu-num-layers", "2", "--emu-forward-ms", "20",
            "--emu-backward-ms", "40", "--log-every", "1000", "--checkpoint-every", "100000"]
    with odyssey_in_background(3, run_dir, "train_gpt.py", args) as job:
        assert main(["--run-dir", str(run_dir), "--trace", str(trace), "--world-size", "3",
                     "--wait-s", "120"]) == 0
        out, _ = job.communicate(timeout=150)
    assert job.returncode == 0, out[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    ev = [e for e in report["events"] if e["kind"] == "recovery"]
    assert [(e["ranks_lost"], e["newcomers"]) for e in ev] == [([1], []), ([], [3])]
    assert ev[0]["phase"] == "backward"
    faults = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    t0 = json.loads((run_dir / "metrics.jsonl").read_text().partition("\n")[0])["time"]
    assert [f["rank"] for f in faults] == [1] and faults[0]["time"] - t0 >= 1.0
    assert sorted(ev[1]["members"]) == [0, 2, 3]
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0

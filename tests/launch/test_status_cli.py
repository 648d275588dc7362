"""`odyssey status` against a stand-in job (a store in this process): the readable block,
the JSON line, a finished job's final state, and one clear line when no job is there."""

from __future__ import annotations

import json
import time

from launch.cli import main as odyssey
from launch.run_files import write_launcher_file
from odyssey import contract
from tests.launch.live_store import live_store

RECORD = {
    "state": "training", "time": 0.0, "mode": "emulated", "generation": 1, "leader": 0,
    "members": [{"rank": 0, "node": 0, "host": "10.0.0.1"},
                {"rank": 2, "node": 1, "host": "10.0.0.2"}],
    "plan": {"pipelines": 2, "stages": [1, 1], "ranks": 2, "kind": "reroute",
             "global_batch": 8},
    "step": 41, "steps": 100, "steps_per_s": 3.5, "samples_per_s": 28.0,
    "step_time_s": 0.29, "loss": 2.5,
    "recovery_counts": [{"kind": "reroute", "cause": "failure", "count": 1}],
    "recoveries": [], "fenced": [1], "checkpoint": {"step": 39, "time": 0.0},
    "last_recovery": {"generation": 1, "time": 0.0, "cause": "failure", "chosen": "reroute",
                      "ranks_lost": [1], "newcomers": [], "step": 30, "mttr_s": 0.094,
                      "detect_s": 0.03, "phases": {"detect": 0.03, "agree": 0.064}},
    "stragglers": [{"rank": 2, "factor": 3.1, "since_step": 35}], "prometheus_addr": "",
}


def test_no_job_is_one_clear_line(tmp_path, capsys):
    assert odyssey(["status", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launcher-node0.json not found" in err[0]


def test_status_of_a_running_job(tmp_path, capsys):
    with live_store(tmp_path) as (store, _):
        assert odyssey(["status", "--run-dir", str(tmp_path)]) == 0
        assert "no step committed yet" in capsys.readouterr().out
        store.set(contract.STATUS_RECORD, json.dumps({**RECORD, "time": time.time()}))
        store.set(contract.METRICS_ENDPOINT, "127.0.0.1:9400")
        assert odyssey(["status", "--run-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        for needle in ("training, step 41/99, generation 1", "3.50 steps/s", "28.0 samples/s",
                       "reroute: 2 pipeline(s) x [1, 1] stages on 2 ranks",
                       "node 0 (10.0.0.1): 0; node 1 (10.0.0.2): 2",
                       "1 (reroute after failure: 1)", "failure of [1] at step 30 -> reroute",
                       "MTTR 94 ms [detect 30, agree 64 ms]", "rank 2 3.1x slower since step 35",
                       "fenced      [1]", "step 39", "http://127.0.0.1:9400/metrics"):
            assert needle in out, (needle, out)
        assert odyssey(["status", "--run-dir", str(tmp_path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["step"] == 41
        # the job finishes: --watch prints the final state and returns
        store.set(contract.JOB_STATUS, contract.JOB_DONE)
        assert odyssey(["status", "--run-dir", str(tmp_path), "--watch", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "finished"
        assert odyssey(["status", "--run-dir", str(tmp_path), "--token", "0" * 64]) == 2
        assert "not this job's" in capsys.readouterr().err


def test_a_finished_job_shows_its_final_state(tmp_path, capsys):
    write_launcher_file(str(tmp_path), 0, {"store_addr": "127.0.0.1", "store_port": 1,
                                           "world_size": 2, "exit_code": 0})
    assert odyssey(["status", "--run-dir", str(tmp_path)]) == 1  # ended, nothing left
    assert "has already ended (exit 0)" in capsys.readouterr().err
    (tmp_path / contract.STATUS_FILE).write_text(json.dumps({**RECORD, "state": "finished"}))
    assert odyssey(["status", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "has finished; its final state" in out and "finished, step 41/99" in out

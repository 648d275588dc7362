"""The `odyssey` command: subcommands, and `odyssey inject` against a live job."""

import json
import time

import pytest

from launch.cli import main as odyssey
from tests.helpers import odyssey_in_background


def test_subcommands_are_registered_and_explain_themselves(capsys):
    for cmd in ("run", "inject", "plan", "profile"):
        assert odyssey([cmd, "--help"]) == 0
        assert "usage" in capsys.readouterr().out.lower()
    assert odyssey(["bench", "list"]) == 0
    assert "mttr" in capsys.readouterr().out
    assert odyssey(["bench", "no-such-benchmark"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_inject_without_a_job_is_a_clear_error(tmp_path, capsys):
    assert odyssey(["inject", "--run-dir", str(tmp_path), "--rank", "0", "--kind", "kill"]) == 1
    assert "launcher-node0.json not found" in capsys.readouterr().err
    assert odyssey(["inject", "--run-dir", str(tmp_path), "--kind", "explode"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_inject_into_a_running_job(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--mode", "emulated", "--dp", "2", "--steps", "400", "--num-microbatches", "2",
            "--microbatch-size", "1", "--emu-num-layers", "2", "--log-every", "1000"]
    with odyssey_in_background(2, run_dir, "train_gpt.py", args) as job:
        deadline = time.time() + 90
        while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (run_dir / "metrics.jsonl").exists(), "job never started training"
        base = ["inject", "--run-dir", str(run_dir)]
        assert odyssey([*base, "--rank", "7", "--kind", "kill"]) == 2  # unknown rank
        assert odyssey([*base, "--rank", "1", "--kind", "kill", "--phase", "backward"]) == 0
        out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    ev = [e for e in report["events"] if e["kind"] == "recovery"]
    assert len(ev) == 1 and ev[0]["ranks_lost"] == [1] and ev[0]["phase"] == "backward"
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0

"""One job per run directory: the lock names its owner, a stale one is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from launch.run_lock import RunDirLock, RunDirLocked
from odyssey import contract
from tests.conftest import ROOT
from tests.helpers import WORKER_ENV, odyssey_in_background


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_lock_is_refused_naming_the_first(tmp_path):
    with RunDirLock(tmp_path, "job-a"):
        with pytest.raises(RunDirLocked, match=r"in use by job job-a \(pid \d+ on host"):
            RunDirLock(tmp_path, "job-b").acquire()
    assert not (tmp_path / contract.RUN_LOCK_FILE).exists()  # released on the way out


def test_stale_lock_of_a_dead_launcher_is_taken_over(tmp_path, caplog):
    owner = {"host": socket.gethostname(), "pid": dead_pid(), "job_id": "old", "time": 0}
    (tmp_path / contract.RUN_LOCK_FILE).write_text(json.dumps(owner))
    with caplog.at_level("WARNING", logger="launch"), RunDirLock(tmp_path, "new"):
        held = json.loads((tmp_path / contract.RUN_LOCK_FILE).read_text())
        assert held["job_id"] == "new" and held["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "job old" in caplog.text


def test_lock_of_another_host_is_not_guessed_stale(tmp_path):
    owner = {"host": "elsewhere", "pid": dead_pid(), "job_id": "far", "time": 0}
    (tmp_path / contract.RUN_LOCK_FILE).write_text(json.dumps(owner))
    with pytest.raises(RunDirLocked, match="job far .* on host elsewhere"):
        RunDirLock(tmp_path, "new").acquire()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_second_job_on_a_locked_run_dir_exits_2_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--steps", "400", "--gpt-n-blocks", "1", "--gpt-d-model", "16"]
    with odyssey_in_background(1, run_dir, "train_gpt.py", args) as first:
        lock = run_dir / contract.RUN_LOCK_FILE
        for _ in range(600):
            if lock.exists() and lock.read_text():
                break
            first.poll()
            assert first.returncode is None
            time.sleep(0.05)
        owner = json.loads(lock.read_text())
        second = subprocess.run(
            [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node",
             "1", "--run-dir", str(run_dir), str(ROOT / "examples" / "train_gpt.py"), *args],
            cwd=ROOT, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True,
            timeout=60)
        assert second.returncode == 2
        assert f"job {owner['job_id']}" in second.stderr and str(owner["pid"]) in second.stderr
        first.kill()


def test_ray_backend_takes_the_same_lock(tmp_path, capsys):
    pytest.importorskip("ray")
    from launch.run import main as run_main
    (tmp_path / "train.py").write_text("")
    with RunDirLock(tmp_path, "job-a"):
        code = run_main(["--backend", "ray", "--nproc-per-node", "1", "--run-dir",
                         str(tmp_path), str(tmp_path / "train.py")])
    assert code == 2 and "in use by job job-a" in capsys.readouterr().err

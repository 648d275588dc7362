"""`odyssey run --backend ray`: a killed actor is recovered from like a killed process.

One local Ray session (the slow part on a small machine) checks, in order: the job starts
as actors in a placement group; SIGKILL of rank 3's actor process is recorded as rank 3
killed by SIGKILL and its training process dies with it; the survivors recover in place;
a replacement actor (--rejoin-after) rejoins and the job re-plans upward; a hung rank is
fenced through ``ray.kill`` of its actor; over all of it the job keeps the failure-free
loss trajectory, no sample is lost or trained twice, replicas stay identical, and the
driver leaves no process behind. Cheap option checks need no Ray session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch.options import UsageError, build_parser, resolve
from tests.conftest import ROOT
from tests.odyssey.test_fault_tolerance import TINY, check_same_numbers, recoveries

STEPS = 16
# rank 0 pauses at step 4 (the window in which the test kills rank 3's actor) and at
# step 9 (time for the replacement actor and its interpreter to start and join); rank 2
# hangs at step 12: its heartbeat stalls, a survivor fences it, the driver ray.kill()s it
FAULTS = ["slow:rank=0,step=4,delay=3", "slow:rank=0,step=9,delay=8",
          "hang:rank=2,step=12,phase=backward"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text`` (our own Ray session's directory)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _complete_lines(path: Path) -> int:
    """Lines written in full so far (the leader may be mid-write)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_killed_actor_recovers_like_a_killed_process_and_a_replacement_rejoins(tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    ray_dir = tempfile.mkdtemp(prefix="odyray-", dir="/tmp")  # short: Ray's socket paths
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.cli", "run", "--backend", "ray",
           "--nproc-per-node", "4", "--run-dir", str(run_dir), "--ray-temp-dir", ray_dir,
           "--finish-grace", "20", "--rejoin-after", "0.2",
           str(ROOT / "examples" / "train_gpt.py"), "--log-every", "100", "--dp", "2",
           "--pp", "2", "--steps", str(STEPS), "--num-microbatches", "4",
           "--microbatch-size", "2", *TINY, "--heartbeat-timeout-s", "1.5", "--inject", *FAULTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = tmp_path / "driver.log"
    launcher = run_dir / "launcher-node0.json"
    metrics = run_dir / "metrics.jsonl"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    info: dict = {}
    try:
        _wait_for(lambda: launcher.exists() and _complete_lines(metrics) >= 4, 90,
                  "step 3 to commit", proc)
        info = json.loads(launcher.read_text())
        assert info["backend"] == "ray" and info["world_size"] == 4
        assert sorted(a["bundle"] for a in info["actors"].values()) == [0, 1, 2, 3]
        victim_pid = info["workers"]["3"]
        os.kill(info["actors"]["3"]["actor_pid"], signal.SIGKILL)  # the actor, not the worker
        proc.wait(timeout=100)
    finally:
        if proc.poll() is None:  # give the driver the chance to shut Ray down itself
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if launcher.exists():  # the latest record: replacements included
            info = json.loads(launcher.read_text())
        ours = [*_pids_mentioning(ray_dir), *map(int, info.get("workers", {}).values()),
                *(a["actor_pid"] for a in info.get("actors", {}).values())]
        deadline = time.monotonic() + 5  # Ray's processes may take a moment to exit
        while any(_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = [p for p in ours if _alive(p)]
        _kill(leftovers)
        shutil.rmtree(ray_dir, ignore_errors=True)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert not leftovers, f"processes left behind: {leftovers}\n{out[-3000:]}"
    assert not _alive(victim_pid)

    # the actor's death became rank 3's exit record, as the torchrun agent writes it
    final = json.loads(launcher.read_text())
    assert final["exits"]["3"]["signal"] == "SIGKILL" and final["exits"]["3"]["pid"] == victim_pid
    assert "3" in final["actors_lost"]
    assert final["job_status"] == "done" and final["exit_code"] == 0

    # same guarantees as the torchrun path: trajectory, ledger, replicas
    report = json.loads((run_dir / "report.json").read_text())
    check_same_numbers(report, run_dir, steps=STEPS)
    events = recoveries(report)
    assert events[0]["cause"] == "failure" and events[0]["ranks_lost"] == [3], events
    # the replacement actor took rank 3's freed bundle and rejoined the running job: in
    # its own generation, or already in the failure's when it announced itself before the
    # survivors agreed (rank 0 sleeps 3 s in step 4, so the agreement waits ~3 s for it, and
    # a replacement that starts faster than that is taken into the same generation)
    causes = [e["cause"] for e in events if e["cause"] != "join" or 4 in e["newcomers"]]
    assert causes in (["failure", "join", "failure"], ["failure", "failure"]), out[-4000:]
    joined = next(e for e in events if 4 in e["newcomers"])
    assert joined["newcomers"] == [4] and 4 in joined["members"]
    assert final["actors"]["4"]["bundle"] == 3
    assert final["exits"]["4"]["exitcode"] == 0
    # the hung rank: fenced by a survivor, killed with its actor, then recorded
    assert [e["ranks_lost"] for e in events if e["cause"] == "failure"][-1] == [2]
    assert "2" in final["fenced"] and "2" in final["actors_lost"]
    assert final["exits"]["2"]["signal"] == "SIGKILL"
    assert not _alive(final["workers"]["2"])


def _opts(*argv: str):
    parser = build_parser()
    return resolve(parser.parse_args([*argv, "train.py"]), parser)


def test_ray_options_are_checked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text("")
    default = _opts("--nproc-per-node", "2")
    assert default.backend == "torchrun" and default.ray is None
    assert default.store_endpoint is None
    with pytest.raises(UsageError, match="only with --backend ray"):
        _opts("--ray-address", "auto")
    with pytest.raises(UsageError, match="leave --nnodes at 1"):
        _opts("--backend", "ray", "--nnodes", "2", "--rdzv-endpoint", "h:1")
    with pytest.raises(UsageError, match="not both 0"):
        _opts("--backend", "ray", "--ray-cpus-per-worker", "0")
    with pytest.raises(UsageError, match="HOST:PORT"):
        _opts("--store-endpoint", "nohost")
    if importlib.util.find_spec("ray") is not None:
        opts = _opts("--backend", "ray", "--nproc-per-node", "3", "--ray-gpus-per-worker",
                     "1", "--ray-strategy", "SPREAD", "--store-endpoint", "[::1]:29600")
        assert opts.nproc == 3 and opts.ray.gpus_per_worker == 1
        assert opts.ray.strategy == "SPREAD" and opts.store_endpoint == "::1:29600"
    else:
        with pytest.raises(UsageError, match="needs the ray package"):
            _opts("--backend", "ray")


@pytest.mark.slow
def test_workers_get_default_signals_even_from_a_blocking_parent(tmp_path):
    # A Ray actor's thread blocks SIGINT; a worker spawned from it would inherit the mask
    # and ignore the launcher's forwarded Ctrl-C. --default-signals must undo that.
    probe = ("import signal,sys\n"
             "st=open('/proc/self/status').read()\n"
             "mask=lambda k:int(st.split(k+':')[1].split()[0],16)\n"
             "bit=1<<(signal.SIGINT-1)\n"
             "sys.exit(0 if not mask('SigBlk')&bit and not mask('SigIgn')&bit else 3)\n")
    parent = ("import signal,sys\n"
              "from launch.workers import spawn\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK,[signal.SIGINT])\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "cmd=[sys.executable,'-c',sys.argv[1]]\n"
              "codes=[spawn(cmd,{},0,0,default_signals=d).proc.wait() for d in (True,False)]\n"
              "print(codes)\n")
    done = subprocess.run([sys.executable, "-c", parent, probe], cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.stdout.strip() == "[0, 3]", done.stdout + done.stderr


@pytest.mark.slow
def test_the_default_path_never_imports_ray():
    code = ("import sys\n"
            "from launch.options import build_parser, resolve\n"
            "import launch.run, launch.ray_backend, launch.ray_actor\n"
            "p = build_parser()\n"
            "o = resolve(p.parse_args(['--nproc-per-node', '2', 'examples/train_gpt.py']), p)\n"
            "assert o.backend == 'torchrun' and 'ray' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]

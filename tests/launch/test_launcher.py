"""Tests for ``odyssey run``: real launcher processes, real workers, real signals.

Each launch starts a launcher and 1-3 workers that import torch (a few seconds on two
cores), so launches are few and every test has a timeout. Every process is killed in
teardown, even when a test fails: the launcher is SIGKILLed (its workers die with it
through PR_SET_PDEATHSIG) and any worker pid still running is SIGKILLed too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import cli
from launch.agent import AgentResult
from launch.supervise import exit_status
from odyssey import contract
from odyssey.control import read_token, sign

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
WORKER = str(REPO / "tests" / "workers" / "sleepy_worker.py")
WORKER_MODULE = "tests.workers.sleepy_worker"  # for -m mode; run with cwd=REPO


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Launch:
    """One ``python -m launch run ...`` process and handles on its store and workers."""

    def __init__(self, tmp_path: Path, launcher_args: list[str], worker_args: list[str],
                 name: str = "run", node: int = 0, channel: str = "store",
                 module: bool = False) -> None:
        self.run_dir = tmp_path / name
        self.node = node
        self.channel = channel
        self.log_path = tmp_path / f"{name}-node{node}.log"
        self.pids: dict[int, int] = {}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        # Unset, so the launcher's defaults for workers (both "1"/"ERROR") are what we see.
        env.pop("OMP_NUM_THREADS", None)
        env.pop("TORCH_CPP_LOG_LEVEL", None)
        cmd = [sys.executable, "-m", "launch", "run", "--run-dir", str(self.run_dir),
               "--monitor-interval", "0.05", *launcher_args,
               *(["-m", WORKER_MODULE] if module else [WORKER]), "--channel", channel,
               *worker_args]
        with open(self.log_path, "w") as log:
            # Own session: teardown can kill the launcher without touching pytest.
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._store: dist.TCPStore | None = None

    def info(self) -> dict:
        """The launcher's ``launcher-node<N>.json`` (waits for it to appear)."""
        path = self.run_dir / f"launcher-node{self.node}.json"
        _wait_until(path.exists, 30, f"{path}")
        return json.loads(path.read_text())

    @property
    def store(self) -> dist.TCPStore:
        if self._store is None:
            info = self.info()
            self._store = dist.TCPStore(info["store_addr"], info["store_port"],
                                        is_master=False, timeout=timedelta(seconds=20))
        return self._store

    # The worker's test/* keys live in the store or in files, per the worker's --channel.
    def _test_key(self, key: str) -> str | None:
        if self.channel == "store":
            return self.store.get(key).decode() if self.store.check([key]) else None
        path = self.run_dir / key.replace("/", "_")
        return path.read_text() if path.exists() else None

    def wait_ready(self, ranks: range) -> dict[int, int]:
        """Wait until every rank reported in; returns rank -> pid."""
        keys = [f"test/ready/{r}" for r in ranks]
        _wait_until(lambda: all(self._test_key(k) for k in keys), 30, "workers ready")
        self.pids = {r: int(self._test_key(k)) for r, k in zip(ranks, keys)}
        return self.pids

    def beats(self, rank: int) -> int:
        return int(self._test_key(f"test/beat/{rank}") or 0)

    def token(self) -> str:
        """The job token the launcher wrote into the run dir."""
        return read_token(str(self.run_dir))

    def fence(self, rank: int, reason: str) -> None:
        """Ask for a fence as a survivor does: the reason signed with the job token."""
        key = contract.fence_key(rank)
        self.store.set(key, sign(self.token(), key, reason))
        self.store.add(contract.FENCES_COUNT, 1)

    def finish(self) -> None:
        """Tell waiting workers to exit."""
        if self.channel == "store":
            self.store.set("test/finish", "1")
        else:
            (self.run_dir / "test_finish").write_text("1")

    def wait_key(self, key: str, timeout: float = 10) -> bytes:
        """Wait for a key in the launcher's store and return its value."""
        _wait_until(lambda: self.store.check([key]), timeout, key)
        return self.store.get(key)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log_path.read_text()

    def kill_everything(self) -> None:
        """Teardown: SIGKILL the launcher and any worker still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        worker_pids = set(self.pids.values())
        path = self.run_dir / f"launcher-node{self.node}.json"
        if path.exists():
            worker_pids |= set(json.loads(path.read_text())["workers"].values())
        for pid in worker_pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = b"sleepy_worker" in f.read()
            except OSError:
                continue
            if ours and _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """Factory: ``launch(launcher_args, worker_args)`` -> :class:`Launch`; all cleaned up."""
    started: list[Launch] = []

    def start(launcher_args: list[str], worker_args: list[str], **kw) -> Launch:
        started.append(Launch(tmp_path, launcher_args, worker_args, **kw))
        return started[-1]

    yield start
    for launched in started:
        launched.kill_everything()


# -- survivors, exit records, fencing ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigkill_one_worker_keeps_survivors_and_records_exit(launch) -> None:
    run = launch(["--nproc-per-node", "3"], ["--wait"], channel="file")
    pids = run.wait_ready(range(3))

    os.kill(pids[1], signal.SIGKILL)
    record = json.loads(run.wait_key(contract.exit_key(1)))
    assert record["rank"] == 1 and record["pid"] == pids[1]
    assert record["signal"] == "SIGKILL" and record["exitcode"] == -signal.SIGKILL
    assert abs(record["time"] - time.time()) < 30
    assert run.store.add(contract.EXITS_COUNT, 0) == 1

    # The survivors were not touched: alive, and still making progress.
    before = {r: run.beats(r) for r in (0, 2)}
    time.sleep(0.5)
    for r in (0, 2):
        os.kill(pids[r], 0)
        assert _alive(pids[r])
        assert run.beats(r) > before[r], f"rank {r} stopped heartbeating"
    assert not run.store.check([contract.exit_key(0)])
    assert run.proc.poll() is None

    # Fencing a rank that is already dead is answered at once.
    run.fence(1, "already gone")
    fenced = json.loads(run.wait_key(contract.fenced_key(1), timeout=5))
    assert fenced["rank"] == 1 and fenced["reason"] == "already gone"

    # Success is reported (the test plays the training leader), so the lost rank does
    # not fail the job.
    run.store.set(contract.JOB_STATUS, contract.JOB_DONE)
    run.finish()
    assert run.wait() == 0
    out = run.output()
    assert "killed by SIGKILL" in out and "job status 'done' -> exit 0" in out
    exits = run.info()["exits"]
    assert exits["1"]["signal"] == "SIGKILL"
    assert exits["0"]["exitcode"] == 0 and exits["2"]["exitcode"] == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fence_kills_a_stopped_worker(launch) -> None:
    run = launch(["--nproc-per-node", "2"], ["--wait"], channel="file")
    pids = run.wait_ready(range(2))

    os.kill(pids[1], signal.SIGSTOP)  # a "hung" rank: alive, but does nothing
    # A fence without the job token's HMAC (anyone who reaches the store port could
    # write one) is ignored, with one log line; the signed one below is obeyed.
    run.store.set(contract.fence_key(0), "forged")
    run.fence(1, "hung in all-reduce")
    fenced = json.loads(run.wait_key(contract.fenced_key(1), timeout=5))
    assert fenced == {"rank": 1, "time": fenced["time"], "reason": "hung in all-reduce"}
    # The fence is only confirmed after the process is dead and its exit recorded.
    assert not _alive(pids[1])
    record = json.loads(run.store.get(contract.exit_key(1)))
    assert record["signal"] == "SIGKILL"
    assert fenced["time"] >= record["time"]

    before = run.beats(0)
    time.sleep(0.3)
    assert run.beats(0) > before, "rank 0 should keep running after the fence"
    assert not run.store.check([contract.fenced_key(0)]) and _alive(pids[0])
    assert run.output().count(f"ignoring {contract.fence_key(0)}") == 1

    # Any client may report success; here the test plays the training leader.
    run.store.set(contract.JOB_STATUS, contract.JOB_DONE)
    run.finish()
    assert run.wait() == 0
    assert "fenced: hung in all-reduce" in run.output()


# -- exit status ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_clean_run_exits_zero_and_sets_worker_env(launch) -> None:
    # Store channel + gloo: workers reach the launcher's store both ways the contract
    # promises (ODYSSEY_STORE_* and env:// via MASTER_*), and rank 0 reports success.
    run = launch(["--nproc-per-node", "2"], ["--gloo", "--done"])
    assert run.wait() == 0, run.output()
    info = run.info()
    assert info["exit_code"] == 0 and info["job_status"] == "done"
    assert "job status 'done' -> exit 0" in run.output()
    for rank in range(2):
        env = json.loads((run.run_dir / f"env-{rank}.json").read_text())
        assert env == {
            "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(info["store_port"]), "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1",
            contract.ENV_STORE_ADDR: "127.0.0.1",
            contract.ENV_STORE_PORT: str(info["store_port"]),
            contract.ENV_RUN_DIR: str(run.run_dir), contract.ENV_LAUNCHER: "1",
            # single node: workers bind loopback; the job token is the run dir's
            contract.ENV_HOST: "127.0.0.1", contract.ENV_TOKEN: run.token(),
            "TORCH_CPP_LOG_LEVEL": "ERROR",
        }
    token_file = run.run_dir / contract.TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # its owner's only


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_worker_exit_3_without_success_key_fails_in_module_mode(launch) -> None:
    # Also covers torchrun's -m mode.
    run = launch(["--nproc-per-node", "2"], ["--exit-code", "1=3"], channel="file",
                 module=True)
    assert run.wait() == 1
    info = run.info()
    assert info["exits"]["1"]["exitcode"] == 3 and info["exits"]["1"]["signal"] is None
    assert info["exits"]["0"]["exitcode"] == 0
    assert "exit 3" in run.output()


def test_exit_status_rules() -> None:
    ok = contract.ExitRecord(0, 10, 0, None, 0.0)
    bad = contract.ExitRecord(1, 11, -9, "SIGKILL", 0.0)
    exits = {0: ok, 1: bad}
    assert exit_status(AgentResult(exits={0: ok}), {0: ok}, expected=1) == 0
    assert exit_status(AgentResult(exits=exits), exits, expected=2) == 1
    # A rank with no exit record (its node vanished) is not a success.
    assert exit_status(AgentResult(exits={0: ok}), {0: ok}, expected=2) == 1
    assert exit_status(AgentResult(exits=exits, job_status="done"), exits, expected=2) == 0
    failed = AgentResult(exits={0: ok}, job_status="failed")
    assert exit_status(failed, {0: ok}, expected=1) == 1
    stopped = AgentResult(exits={0: ok}, job_status="done", received_signal=signal.SIGTERM)
    assert exit_status(stopped, {0: ok}, expected=1) == 128 + signal.SIGTERM


# -- signals and orphans -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_forwards_then_kills_leftovers(launch) -> None:
    run = launch(["--nproc-per-node", "2", "--shutdown-timeout", "1"],
                 ["--wait", "--ignore-sigterm", "1"], channel="file")
    pids = run.wait_ready(range(2))
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=15) == 128 + signal.SIGTERM
    assert not any(_alive(pid) for pid in pids.values())
    out = run.output()
    assert "received SIGTERM" in out
    assert "rank 0 (pid" in out and "killed by SIGTERM" in out  # rank 0 obeyed SIGTERM
    assert "killed by SIGKILL" in out  # rank 1 ignored it and was killed


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigkilled_launcher_leaves_no_orphans(launch) -> None:
    run = launch(["--nproc-per-node", "1"], ["--wait"], channel="file")
    pid = run.wait_ready(range(1))[0]
    os.killpg(run.proc.pid, signal.SIGKILL)  # cannot be caught: PDEATHSIG must act
    run.wait()
    _wait_until(lambda: not _alive(pid), 5, "worker to die with its launcher")


# -- multi-node --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_nodes_rendezvous_and_share_node0_store(launch) -> None:
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "smoke",
              "--local-addr", "127.0.0.1", "--node-timeout", "20"]
    # File channel: the launchers, not the workers, are under test here (and it is cheap).
    nodes = [launch(common, [], node=n, channel="file") for n in range(2)]
    codes = [node.wait(timeout=60) for node in nodes]
    assert codes == [0, 0], [node.output() for node in nodes]
    envs = [json.loads((nodes[0].run_dir / f"env-{r}.json").read_text()) for r in range(2)]
    assert {e["GROUP_RANK"] for e in envs} == {"0", "1"}
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_RANK"] == "0" for e in envs)
    assert envs[0][contract.ENV_STORE_PORT] == envs[1][contract.ENV_STORE_PORT]
    assert envs[0][contract.ENV_TOKEN] == envs[1][contract.ENV_TOKEN]  # one job, one token
    assert envs[0]["GROUP_RANK"] == envs[0]["RANK"] and envs[1]["GROUP_RANK"] == envs[1]["RANK"]


# -- command line -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_help(capsys) -> None:
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "run" in top and "survivors" in top
    assert cli.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--nproc-per-node", "--rdzv-endpoint", "--max-restarts", "--run-dir",
                   "--store-port", contract.fence_key("{rank}"),
                   contract.ENV_STORE_PORT, contract.ENV_HOST, "--token-file", "exit status"):
        assert needle in text
    # The console entry point itself, as a user would run it.
    done = subprocess.run([sys.executable, "-m", "launch", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "odyssey" in done.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--nproc-per-node", "0", WORKER], "--nproc-per-node must be at least 1"),
    (["run", "--nproc-per-node", "lots", WORKER], "--nproc-per-node"),
    (["run", "no/such/script.py"], "training script not found: no/such/script.py"),
    (["run", "--nnodes", "2:1", WORKER], "--nnodes"),
    (["run", "--standalone", "--nnodes", "2", WORKER], "--standalone"),
    (["run", "--signals-to-handle", "SIGNOPE", WORKER], "unknown signal"),
    (["run"], "training_script"),
    (["bogus"], "invalid choice"),
    ([], "COMMAND"),
])
def test_bad_input_is_rejected_clearly(capsys, argv: list[str], message: str) -> None:
    assert cli.main(argv) != 0
    assert message in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_busy_store_port_is_reported(capsys, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        argv = ["run", "--run-dir", str(tmp_path), "--store-port", str(port), WORKER]
        assert cli.main(argv) == 1
    assert f"cannot host the store on 127.0.0.1:{port}" in capsys.readouterr().err

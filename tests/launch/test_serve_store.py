"""`odyssey store` + `odyssey run --store-endpoint`: the store lives apart from the workers.

Two launchers (c10d rendezvous) run a real job against a store served by its own
process. SIGKILL of node 0's launcher -- which takes its worker, the leader, with it --
no longer loses the job: node 0's silent heartbeat gets it declared lost within
--node-timeout, node 1 recovers in place well under the 16 s that waiting out the join and
fence timeouts took, and finishes on the failure-free trajectory; the job's keys are in
the separate store, a second job is refused that used store, and the store exits by
itself after the job is done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from odyssey import contract
from tests.conftest import ROOT
from tests.odyssey.test_fault_tolerance import TINY, check_same_numbers

pytestmark = pytest.mark.slow  # every test here starts `odyssey store` / `odyssey run` processes

STEPS = 6


def _serve(tmp_path, *extra: str) -> tuple[subprocess.Popen, dict]:
    """Start `odyssey store` on a free loopback port; returns it and its endpoint file."""
    endpoint_file = tmp_path / "store.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "store", "--host", "127.0.0.1", "--port", "0",
         "--endpoint-file", str(endpoint_file), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 30
    while not endpoint_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            raise AssertionError("odyssey store did not start")
        time.sleep(0.05)
    return server, json.loads(endpoint_file.read_text())


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=5)


def _launch(tmp_path, endpoint: str, name: str, steps: int = STEPS,
            inject: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node", "2",
           "--store-endpoint", endpoint, "--run-dir", str(tmp_path / name),
           "--finish-grace", "20", str(ROOT / "examples" / "train_gpt.py"), "--log-every",
           "100", "--dp", "2", "--steps", str(steps), "--num-microbatches", "4",
           "--microbatch-size", "2", *TINY, *(("--inject", *inject) if inject else ())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_losing_node0_is_survivable_when_the_store_lives_apart(tmp_path):
    # Two launchers (c10d rendezvous) share a separate store. SIGKILL node 0's launcher:
    # its worker (rank 0, the leader) dies with it and its launcher cannot record that
    # exit; node 0's heartbeat stops, a watcher (node 1's launcher or the store) declares
    # it lost and writes rank 0's exit record, and node 1's worker takes over and finishes
    # on the failure-free trajectory.
    server, where = _serve(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rdzv_port = s.getsockname()[1]
    run_dir, steps, nodes = tmp_path / "run", 12, []
    try:
        for n in range(2):
            log = open(tmp_path / f"node{n}.log", "w")
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "launch.cli", "run", "--nnodes", "2",
                 "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{rdzv_port}", "--rdzv-id", "apart", "--local-addr", "127.0.0.1",
                 "--node-timeout", "3", "--store-endpoint",
                 f"{where['addr']}:{where['port']}", "--run-dir", str(run_dir),
                 "--finish-grace", "20", str(ROOT / "examples" / "train_gpt.py"),
                 "--log-every", "100", "--dp", "2", "--steps", str(steps),
                 "--num-microbatches", "4", "--microbatch-size", "2", *TINY,
                 "--heartbeat-timeout-s", "1.5",
                 "--inject", "slow:rank=0,step=4,delay=3"],  # the window for the kill
                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 4):
            assert time.monotonic() < deadline and nodes[1].poll() is None, "no step 3"
            time.sleep(0.05)
        node0 = json.loads((run_dir / "launcher-node0.json").read_text())
        t_kill = time.time()
        os.kill(node0["launcher_pid"], signal.SIGKILL)
        assert nodes[1].wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
        report = json.loads((run_dir / "report.json").read_text())
        check_same_numbers(report, run_dir, steps=steps)
        [event] = [e for e in report["events"] if e["kind"] == "recovery"]
        assert event["ranks_lost"] == [0] and event["members"] == [1]
        client = TCPStore(where["addr"], where["port"], is_master=False,
                          timeout=timedelta(seconds=10))
        assert client.get(contract.JOB_STATUS).decode() == contract.JOB_DONE
        # Kill -> the survivor starts the new generation: was ~16 s (join + fence timeouts)
        # before lost-node detection; now --node-timeout (3 s) + agreement + migration.
        started = json.loads(client.get(contract.started_key(event["generation"], 1)))
        resumed_after = started["started"] - t_kill
        assert resumed_after < 8.0, f"recovery took {resumed_after:.1f}s after the kill"
        record = contract.ExitRecord(**json.loads(client.get(contract.exit_key(0))))
        assert record.node_lost == 0 and record.signal is None  # "node lost", not a signal
        lost = json.loads(client.get(contract.node_lost_key(0)))
        assert lost["by"] in ("node 1", "odyssey store")
        assert not client.check([contract.node_lost_key(1)])
        del client

        again = _launch(tmp_path, f"{where['addr']}:{where['port']}", "again", steps=2)
        assert again.returncode == 1
        assert "already holds a finished job" in again.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        for node in nodes:
            _stop(node)
        _stop(server)
    assert "odyssey store: stopped" in server.stdout.read()


@pytest.mark.timeout(60)
def test_store_command_options_and_exit_after_done(tmp_path):
    from launch.serve_store import main

    assert main(["--port", "70000"]) == 2
    assert main(["--exit-after-done", "-1"]) == 2
    server, where = _serve(tmp_path, "--exit-after-done", "0")
    try:
        client = TCPStore(where["addr"], where["port"], is_master=False,
                          timeout=timedelta(seconds=10))
        time.sleep(0.6)
        assert server.poll() is None  # no job status yet: keeps serving
        client.set(contract.JOB_STATUS, contract.JOB_DONE)
        assert server.wait(timeout=10) == 0
    finally:
        _stop(server)
    assert "job status 'done'" in server.stdout.read()

"""The "node" control plane (monitor.control_plane = "node").

Unit level: a worker's heartbeat and notice watcher make no store request at all (a
counting adapter around the store client proves it, and proves that "notify" does make
them); the notice its launcher relays into the node-local directory raises the local
flag. End to end: a SIGKILL and a SIGSTOP hang under `--monitor.control-plane node`
recover in place with the failure-free trajectory, nothing lost or trained twice, and
the hung rank fenced by its own launcher.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from odyssey import contract
from odyssey.commit import ABORT, CommitProtocol
from odyssey.liveness_files import read_beat, write_notice
from odyssey.monitor import FailureMonitor, MonitorConfig
from tests.odyssey.test_fault_tolerance import STEPS, TINY, check_same_numbers, recoveries, run_job


class CountingStore:
    """A store client that counts every request made through it."""

    def __init__(self, store: TCPStore) -> None:
        self._store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


@pytest.fixture
def server(tcp_store):
    return tcp_store


def _monitor(server: TCPStore, plane: str, tmp_path) -> tuple[FailureMonitor, list]:
    clients: list[CountingStore] = []

    def client() -> CountingStore:
        c = CountingStore(TCPStore("127.0.0.1", server.port, is_master=False,
                                   timeout=timedelta(seconds=10)))
        clients.append(c)
        return c

    cfg = MonitorConfig(control_plane=plane, heartbeat_s=0.05, heartbeat_timeout_s=0.4)
    mon = FailureMonitor(client(), 0, cfg, store_factory=client, token="t",
                         liveness_dir=str(tmp_path))
    return mon, clients


def _requests(clients: list[CountingStore]) -> int:
    return sum(len(c.calls) for c in clients)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plane", ["node", "notify"])
def test_node_plane_heartbeats_and_watches_without_store_requests(server, tmp_path, plane):
    mon, clients = _monitor(server, plane, tmp_path)
    mon.watch(0, [0, 1])
    mon.start_heartbeat()
    try:
        time.sleep(0.6)  # many heartbeat periods and, for notify, a watcher period
        assert mon.notified and mon.notice() is None and mon.abort_check() is None
        if plane == "notify":  # the adapter does see the other plane's traffic
            assert _requests(clients) > 5
            return
        assert _requests(clients) == 0
        beat = read_beat(str(tmp_path), 0)
        time.sleep(0.15)
        assert beat is not None and read_beat(str(tmp_path), 0) != beat  # it beats locally
        # the launcher relays generation 0's notice: the watcher raises the local flag
        write_notice(str(tmp_path), {"kind": "failure", "reason": "rank(s) [1] exited",
                                     "suspects": [1], "by": "launcher 0", "gen": 0,
                                     "time": time.time()})
        deadline = time.monotonic() + 2
        while mon.notice() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mon.abort_check() == "failure: rank(s) [1] exited" and 0 in mon.noticed_at
        mon.watch(1, [0])  # the next generation has no notice yet
        time.sleep(0.05)
        assert mon.notice() is None
        assert _requests(clients) == 0  # heartbeat and watcher never asked the store
    finally:
        mon.stop()
    if plane == "node":  # a stopped monitor takes its heartbeat file away: not a hang
        assert read_beat(str(tmp_path), 0) is None


@pytest.mark.timeout(30)
def test_node_plane_watcher_wakes_on_the_launchers_pipe(server, tmp_path, monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setenv(contract.ENV_LIVENESS_WAKE_FD, str(read_end))
    mon, clients = _monitor(server, "node", tmp_path)
    mon.watch(0, [0, 1])
    mon.start_heartbeat()
    try:
        time.sleep(0.1)
        assert mon.notice() is None
        write_notice(str(tmp_path), {"kind": "failure", "reason": "rank(s) [1] exited",
                                     "suspects": [1], "by": "launcher 0", "gen": 0,
                                     "time": time.time()})
        t0 = time.monotonic()
        os.write(write_end, b"n")  # what the launcher's relay does after writing the file
        while mon.notice() is None and time.monotonic() - t0 < 2:
            time.sleep(0.001)
        assert mon.notice() is not None and time.monotonic() - t0 < 0.5
        assert _requests(clients) == 0
    finally:
        mon.stop()
        os.close(write_end)
        os.close(read_end)


@pytest.mark.timeout(30)
def test_node_plane_notice_wakes_a_rank_blocked_on_the_decision(server, tmp_path):
    # A rank voted and blocks on step 2's decision with a 30 s backstop slice; the
    # launcher relays a notice: the rank's watcher aborts the decision with its idle
    # client and the vote returns at once. Before the notice that client asked nothing.
    mon, clients = _monitor(server, "node", tmp_path)
    mon.watch(0, [0, 1])
    mon.start_heartbeat()
    try:
        assert mon.wakes_decisions
        commit = CommitProtocol(server, 0, [0, 1], 0.02, mon.abort_check,
                                on_notice=mon.on_notice, woken_poll_s=30.0)
        got = {}
        t = threading.Thread(target=lambda: got.update(d=commit.vote(0, 2, {})))
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and _requests(clients) == 0
        t0 = time.monotonic()
        write_notice(str(tmp_path), {"kind": "failure", "reason": "rank(s) [1] exited",
                                     "suspects": [1], "by": "launcher 0", "gen": 0,
                                     "time": time.time()})
        t.join(10)
        assert got["d"] == (ABORT, None) and time.monotonic() - t0 < 5
        assert server.get(contract.abort_reason_key(0, 2)).decode() == (
            "failure: rank(s) [1] exited")
    finally:
        mon.stop()


def test_node_plane_needs_a_launcher_directory(server, monkeypatch):
    monkeypatch.delenv(contract.ENV_LIVENESS_DIR, raising=False)
    with pytest.raises(ValueError, match="control_plane 'node' needs a launcher"):
        FailureMonitor(server, 0, MonitorConfig(control_plane="node"))


NODE_SCENARIOS = {
    "kill": ("reroute", ["kill:rank=3,step=3,phase=forward"], []),
    "hang-is-fenced": ("adaptive", ["hang:rank=2,step=5,phase=backward"],
                       ["--heartbeat-timeout-s", "1.5"]),
}


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(NODE_SCENARIOS))
def test_node_plane_recovers_with_the_same_numbers(name, tmp_path):
    policy, faults, extra = NODE_SCENARIOS[name]
    report, proc = run_job(tmp_path, 4, [
        "--dp", "2", "--pp", "2", "--steps", str(STEPS), "--num-microbatches", "4",
        "--microbatch-size", "2", "--ft-policy", policy, "--monitor.control-plane", "node",
        *TINY, *extra, "--inject", *faults])
    check_same_numbers(report, tmp_path / "run")
    events = recoveries(report)
    injected = sorted({int(f.split("rank=")[1].split(",")[0]) for f in faults})
    assert sorted(r for e in events for r in e["ranks_lost"]) == injected
    if name.startswith("hang"):
        # found by its own launcher from the node-local heartbeat file, and fenced by it
        assert "rank 2: heartbeat stalled" in proc.stderr and "fencing rank 2" in proc.stderr
        assert events[0]["phases"]["detect"] >= 1.5 - 0.2 - 0.1

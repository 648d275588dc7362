"""The launcher's half of the "node" control plane (launch/node_liveness.py).

Local heartbeat files are timed on the launcher's clock; a stopped monitor's silence is
not a hang; the relay copies each generation's notice from the store into the
node-local directory, in order; a launcher fences a local worker whose heartbeat file
stalls, after publishing the notice that names it; the Ray backend refuses the plane.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from launch.agent import Agent, AgentConfig
from launch.node_liveness import (
    LocalHeartbeats,
    NodePlane,
    NoticeRelay,
    make_liveness_dir,
    remove_liveness_dir,
)
from launch.options import UsageError, build_parser, resolve
from launch.preflight import check
from launch.store import SafeStore
from launch.workers import spawn
from odyssey import contract
from odyssey.liveness_files import BeatFile, read_notice
from tests.conftest import ROOT, store_client


@pytest.fixture
def store(tcp_store):
    return tcp_store


def _notice(gen: int, reason: str) -> str:
    return json.dumps({"kind": "failure", "reason": reason, "suspects": [], "by": 0,
                       "gen": gen, "time": time.time()})


def test_stalled_heartbeat_files_are_timed_on_the_launchers_clock(tmp_path):
    d = str(tmp_path)
    hb = LocalHeartbeats(d)
    a, b = BeatFile(d, 0, 1.0), BeatFile(d, 1, 5.0)
    assert hb.stalled([0, 1, 2], now=100.0) == []  # rank 2 never beat: not watched
    a.beat()
    assert hb.stalled([0, 1], now=100.9) == []
    assert hb.stalled([0, 1], now=101.5) == []  # rank 0 moved at 100.9
    assert hb.stalled([0, 1], now=102.0) == [(0, pytest.approx(1.1))]
    assert hb.timeout_s(1) == 5.0  # what each rank's monitor said it allows
    b.close()  # a monitor that stops on purpose leaves no file behind
    assert not hb.beating(1) and hb.stalled([1], now=200.0) == []
    a.close()


@pytest.mark.timeout(30)
def test_relay_writes_each_generations_notice_in_order(store, tmp_path):
    d = str(tmp_path)
    relay = NoticeRelay(store_client(store), d, wait_s=0.1)
    relay.start()
    try:
        store.set(contract.notice_key(0), _notice(0, "first"))
        store.set(contract.notice_key(1), _notice(1, "second"))
        deadline = time.monotonic() + 5
        while relay.relayed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_notice(d, 0)["reason"] == "first"
        assert read_notice(d, 1)["reason"] == "second"
        assert read_notice(d, 2) is None and relay.relayed == 2
    finally:
        relay.stop()


@pytest.mark.timeout(30)
def test_node_plane_publishes_the_notice_of_a_hung_local_rank(store, tmp_path):
    d = str(tmp_path)
    store.set(contract.GENERATION, "0")
    plane = NodePlane(d, SafeStore(store_client(store)), node_rank=3)
    beat = BeatFile(d, 6, 0.2)
    try:
        assert plane.hung([6]) == []
        assert plane.relay is not None  # a local worker beats: the relay runs
        time.sleep(0.35)
        assert plane.hung([6]) == [(6, "heartbeat stalled > 0.2s")]
        notice = json.loads(store.get(contract.notice_key(0)))
        assert notice["suspects"] == [6] and notice["by"] == "launcher 3"
        assert "stopped heartbeating" in notice["reason"]
        deadline = time.monotonic() + 5  # and relayed back to this node's workers
        while read_notice(d, 0) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_notice(d, 0) == notice
    finally:
        plane.stop()
        beat.close()


@pytest.mark.slow  # one child process
@pytest.mark.timeout(60)
def test_launcher_fences_a_local_worker_whose_heartbeat_file_stalls(store, tmp_path):
    d = make_liveness_dir()
    try:
        store.set(contract.GENERATION, "0")
        code = ("import sys, time; from odyssey.liveness_files import BeatFile; "
                "b = BeatFile(sys.argv[1], 5, 0.3); time.sleep(60)")  # one beat, then silence
        worker = spawn([sys.executable, "-c", code, d], {**os.environ, "PYTHONPATH": str(ROOT)},
                       5, 0)
        worker.liveness_dir = d
        agent = Agent([worker], SafeStore(store_client(store)), AgentConfig(poll_interval_s=0.02))
        t0 = time.monotonic()
        result = agent.run()
        assert time.monotonic() - t0 < 30
        assert result.exits[5].signal == "SIGKILL" and 5 in result.fenced
        assert json.loads(store.get(contract.fenced_key(5)))["reason"].startswith(
            "heartbeat stalled")
        notice = json.loads(store.get(contract.notice_key(0)))
        assert notice["suspects"] == [5] and "stopped heartbeating" in notice["reason"]
    finally:
        remove_liveness_dir(d)


def test_ray_backend_refuses_the_node_plane(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["--backend", "ray", "--nproc-per-node", "2",
                              str(ROOT / "examples" / "train_gpt.py"),
                              "--monitor.control-plane", "node"])
    with pytest.raises(UsageError, match="control-plane node .* Ray backend"):
        check(resolve(args, parser))


@pytest.mark.slow  # generator processes
@pytest.mark.timeout(180)
def test_load_generator_node_plane_counts_per_node_traffic():
    from benchmarks.store_load import measure

    r = measure(16, "node", seconds=1.0, procs=2, step_s=0.25, ranks_per_node=8)
    assert r["nodes"] == 2 and r["plane"] == "node"
    # per node one beat every 0.25 s and a relay blocked in 2 s slices: ~4.5 req/s
    assert 0 < r["launcher_requests_per_s"] < 2 * 6
    assert r["notice_to_all_relays_ms"] is not None
    assert r["notice_to_all_seen_ms"] is not None
    assert r["notice_to_all_agreed_ms"] >= r["notice_to_all_seen_ms"]

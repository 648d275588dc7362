"""Lost-node detection (launch/node_watch.py) on a real TCPStore, with real processes.

A stale node heartbeat is declared lost by exactly one of two watchers, which writes
"node lost" exit records (and fence confirmations) for that node's ranks only; a live
node is never declared. A launcher that finds its own node declared lost kills its
workers; a worker whose node was declared lost cannot join the next generation.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from launch.agent import Agent, AgentConfig
from launch.node_watch import NODE_LOST_EXITCODE, NodeWatchConfig, NodeWatcher
from launch.options import UsageError, build_parser, resolve
from launch.store import SafeStore
from launch.workers import spawn
from odyssey import contract
from odyssey.membership import Fenced, agree
from odyssey.monitor import FailureMonitor, MonitorConfig
from tests.conftest import store_client


@pytest.fixture
def store(tcp_store):
    return tcp_store


@pytest.mark.timeout(30)
def test_stale_node_is_declared_once_with_exit_records_for_its_ranks(store):
    # Node 0 ran ranks 0, 1 (rank 1 already exited for real), node 1 runs ranks 2, 3.
    for rank, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        store.set(contract.worker_key(rank), json.dumps(
            {"rank": rank, "pid": 1000 + rank, "node": node, "host": "h"}))
    real = contract.ExitRecord(1, 1001, 3, None, time.time())
    store.set(contract.exit_key(1), real.to_json())
    store.add(contract.EXITS_COUNT, 1)
    store.add(contract.node_beat_key(0), 1)  # node 0 beat once, then went silent
    cfg = NodeWatchConfig(node_timeout_s=0.6, check_interval_s=0.05)
    # Two watchers on their own connections: node 1's launcher and `odyssey store`.
    watchers = [NodeWatcher(SafeStore(store_client(store)), nodes, 4, cfg, who=who)
                for nodes, who in (([0], "node 1"), ([0, 1], "odyssey store"))]
    declared: list[tuple[str, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.6:
        store.add(contract.node_beat_key(1), 1)  # node 1 lives
        for w in watchers:
            declared += [(w.who, n) for n in w.poll()]
        time.sleep(0.02)
    assert [n for _, n in declared] == [0], declared  # one declaration, by one watcher
    lost = json.loads(store.get(contract.node_lost_key(0)))
    assert lost["by"] == declared[0][0] and lost["silent_s"] > 0.6
    assert all(w.declared.get(0) == lost for w in watchers)  # both know who won
    assert not store.check([contract.node_lost_key(1)])
    rec = contract.ExitRecord(**json.loads(store.get(contract.exit_key(0))))
    assert (rec.rank, rec.pid, rec.exitcode, rec.signal, rec.node_lost) == (
        0, 1000, NODE_LOST_EXITCODE, None, 0)
    assert rec.describe() == "lost with node 0"
    assert rec.time <= lost["time"] - 0.6  # when it was last seen beating, not declared
    assert json.loads(store.get(contract.exit_key(1))) == json.loads(real.to_json())
    assert store.add(contract.EXITS_COUNT, 0) == 2  # rank 1's real exit + rank 0's record
    assert json.loads(store.get(contract.fenced_key(0)))["reason"] == "node 0 lost"
    assert not store.check([contract.fenced_key(1)])
    assert not store.check([contract.exit_key(2), contract.exit_key(3)])


@pytest.mark.timeout(30)
def test_live_finished_and_unstarted_nodes_are_never_declared(store):
    cfg = NodeWatchConfig(node_timeout_s=0.3, check_interval_s=0.02)
    watcher = NodeWatcher(SafeStore(store_client(store)), [0, 1, 2], 3, cfg)
    store.add(contract.node_beat_key(1), 1)
    store.set(contract.node_done_key(1), "1")  # node 1 finished: it stops beating
    # node 2 never beat (still starting): not watched yet
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        store.add(contract.node_beat_key(0), 1)
        assert watcher.poll() == []
        time.sleep(0.05)
    assert not any(store.check([contract.node_lost_key(n)]) for n in range(3))
    store.set(contract.JOB_STATUS, contract.JOB_DONE)  # after the job ends, no declaring
    time.sleep(0.5)
    assert watcher.poll() == [] and not store.check([contract.node_lost_key(0)])


class Counting:
    """A store client that counts the requests made through it."""

    def __init__(self, client) -> None:
        self._client, self.calls = client, 0

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def counted(*args):
            self.calls += 1
            return method(*args)

        return counted


@pytest.mark.timeout(30)
def test_each_launcher_watches_two_ring_successors_and_two_lost_neighbours_are_found(store):
    # 6 nodes; each launcher watches the next 2 live nodes in ring order, so its reads
    # do not grow with the job. Nodes 3 and 4 go silent together: node 2 (their only
    # common watcher), 1 and 3's other watchers declare both, once each.
    n, cfg = 6, NodeWatchConfig(node_timeout_s=0.4, check_interval_s=0.02)
    for node in range(n):
        store.set(contract.worker_key(node), json.dumps(
            {"rank": node, "pid": 100 + node, "node": node, "host": "h"}))
    clients = [Counting(store_client(store)) for _ in range(n)]
    watchers = [NodeWatcher(SafeStore(clients[m]), [(m + i) % n for i in range(1, n)], n,
                            cfg, who=f"node {m}") for m in range(n)]
    assert [w.watched() for w in watchers[:3]] == [[1, 2], [2, 3], [3, 4]]
    for node in range(n):
        store.add(contract.node_beat_key(node), 1)
    for w in watchers:
        w.poll()
    before = [c.calls for c in clients]
    time.sleep(0.03)
    for node in range(n):
        store.add(contract.node_beat_key(node), 1)
    watchers[0].poll()
    # steady: the job status and one counter read per watched node
    assert clients[0].calls - before[0] == 1 + 2
    declared: list[tuple[int, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 and len(declared) < 2:
        for node in (0, 1, 2, 5):
            store.add(contract.node_beat_key(node), 1)
        for m in (0, 1, 2, 5):
            declared += [(m, x) for x in watchers[m].poll()]
        time.sleep(0.02)
    assert sorted(x for _, x in declared) == [3, 4], declared
    assert {m for m, _ in declared} <= {1, 2}  # 3's watchers are 1 and 2; 4's: 2 (and 3)
    assert watchers[2].watched() == [5, 0]  # past the lost ones, still two watched
    assert not any(store.check([contract.node_lost_key(x)]) for x in (0, 1, 2, 5))


@pytest.mark.timeout(60)
def test_launcher_declared_lost_kills_its_workers_and_keeps_the_record(store):
    # A launcher cut off from the store long enough to be declared lost reconnects:
    # its (real) worker must die, and the "node lost" record stays as written.
    lost_record = contract.ExitRecord(7, 1, NODE_LOST_EXITCODE, None, time.time(), 0)
    store.set(contract.exit_key(7), lost_record.to_json())
    store.set(contract.node_lost_key(0), json.dumps({"node": 0, "by": "node 1"}))
    worker = spawn([sys.executable, "-c", "import time; time.sleep(60)"], {}, 7, 0)
    agent = Agent([worker], SafeStore(store_client(store)), AgentConfig(
        poll_interval_s=0.02, beat_key=contract.node_beat_key(0), node_rank=0))
    t0 = time.monotonic()
    result = agent.run()
    assert time.monotonic() - t0 < 5
    assert result.exits[7].signal == "SIGKILL"
    assert worker.proc.returncode == -signal.SIGKILL
    assert json.loads(store.get(contract.exit_key(7))) == json.loads(lost_record.to_json())


@pytest.mark.timeout(30)
def test_worker_of_a_lost_node_cannot_join_the_next_generation(store):
    store.set(contract.exit_key(0), contract.ExitRecord(
        0, 1, NODE_LOST_EXITCODE, None, time.time(), 0).to_json())
    store.add(contract.EXITS_COUNT, 1)
    monitor = FailureMonitor(store, 0, MonitorConfig(join_timeout_s=5.0))
    monitor.watch(0, [0, 1])
    with pytest.raises(Fenced, match="declared lost"):
        agree(store, monitor, 1, 0, [0, 1], committed_step=3)
    assert not store.check([contract.members_key(1)])


@pytest.mark.parametrize("value", ["0.5", "-1"])
def test_node_timeout_below_one_second_is_refused(value, tmp_path):
    script = tmp_path / "t.py"
    script.write_text("")
    parser = build_parser()
    args = parser.parse_args(["--nnodes", "2", "--rdzv-endpoint", "h:1",
                              "--node-timeout", value, str(script)])
    with pytest.raises(UsageError, match="--node-timeout must be >= 1"):
        resolve(args, parser)

"""Agreement and the notify control plane, in one process: threads with their own store
clients against one TCPStore (no training, no process groups)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch.distributed as dist

from odyssey import contract
from odyssey.commit import ABORT, COMMIT, CommitProtocol, abort_step
from odyssey.membership import AgreementError, JobFinished, agree
from odyssey.monitor import FailureMonitor, MonitorConfig
from tests.conftest import store_client


@pytest.fixture
def server(tcp_store):
    return tcp_store


def _monitor(server, rank: int, plane: str, **kw) -> FailureMonitor:
    cfg = MonitorConfig(control_plane=plane, **kw)
    return FailureMonitor(store_client(server), rank, cfg,
                          store_factory=lambda: store_client(server), token="t")


def _exit_record(store: dist.Store, rank: int) -> None:
    rec = contract.ExitRecord.from_returncode(rank, 1, -9, time.time())
    store.set(contract.exit_key(rank), rec.to_json())
    store.add(contract.EXITS_COUNT, 1)


@pytest.mark.parametrize("plane", ["poll", "notify"])
def test_survivors_agree_once_with_a_trace(server, plane):
    _exit_record(server, 3)
    results: dict[int, object] = {}

    def run(r: int) -> None:
        mon = _monitor(server, r, plane)
        mon.watch(0, [0, 1, 2, 3])
        results[r] = agree(mon.store, mon, 1, r, [0, 1, 2, 3], committed_step=4)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == [0, 1, 2]
    outcomes = {m.to_json() for m in results.values()}
    assert len(outcomes) == 1  # one compare-and-set decided it
    m = next(iter(results.values()))
    assert m.members == [0, 1, 2] and m.dead == [3] and m.committed_step == 4
    assert m.trace["by"] in (0, 1, 2) and not m.trace["timed_out"] and m.trace["silent"] == []
    if plane == "notify":  # the last registration decides without waiting a poll
        assert m.trace["polls"] == 1
    joins = [json.loads(server.get(contract.join_key(1, r))) for r in range(3)]
    assert all(j["time"] <= m.trace["all_in"] <= m.decided_at for j in joins)


@pytest.mark.parametrize("finished", [True, False])
def test_a_late_newcomer_never_starts_the_job_over(server, finished):
    # The replacement of a rank lost near the end announces itself after the survivors
    # finished and exited: alone it would train from step 0 over the finished run.
    for r in (0, 1):
        _exit_record(server, r)
    server.add(contract.NEWCOMERS_COUNT, 1)
    server.set(contract.newcomer_key(0), "5")
    if finished:
        server.set(contract.JOB_STATUS, contract.JOB_DONE)
    mon = _monitor(server, 5, "notify")
    mon.watch(2, [0, 1])
    with pytest.raises(JobFinished if finished else AgreementError,
                       match="finished" if finished else "no member of generation 2"):
        agree(mon.store, mon, 3, 5, [0, 1], committed_step=-1)
    assert not server.check([contract.members_key(3)])


def test_watcher_delivers_a_notice_without_polling(server):
    mon = _monitor(server, 0, "notify")
    mon.start_heartbeat()
    try:
        mon.watch(0, [0, 1])
        assert mon.notified and mon.notice() is None and mon.abort_check() is None
        other = _monitor(server, 1, "notify")
        other.watch(0, [0, 1])
        other.publish("failure", "test")
        deadline = time.monotonic() + 5
        while mon.notice() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mon.notice()["reason"] == "test"
        assert mon.abort_check() == "failure: test" and 0 in mon.noticed_at
        mon.watch(1, [0, 1])  # a new generation: the flag is for generation 0 only
        assert mon.notice() is None
    finally:
        mon.stop()


def test_a_notice_wakes_a_rank_blocked_on_the_decision(server):
    # notify: rank 0 voted and blocks on step 3's decision with a 30 s backstop slice; a
    # notice published by another rank makes its watcher abort the decision, and the
    # wait returns at once with the reason recorded (a commit written first would stand)
    mon = _monitor(server, 0, "notify")
    mon.start_heartbeat()
    try:
        mon.watch(0, [0, 1])
        commit = CommitProtocol(store_client(server), 0, [0, 1], 0.02, mon.abort_check,
                                on_notice=mon.on_notice, woken_poll_s=30.0)
        got = {}

        def vote():
            t0 = time.monotonic()
            got["decision"] = commit.vote(0, 3, {"loss": 1.0})
            got["waited_s"] = time.monotonic() - t0

        t = threading.Thread(target=vote)
        t.start()
        time.sleep(0.3)  # blocked in the wait by now
        assert t.is_alive() and "decision" not in got
        published = time.monotonic()
        other = _monitor(server, 1, "notify")
        other.watch(0, [0, 1])
        other.publish("failure", "rank 1 lost")
        t.join(10)
        assert got["decision"] == (ABORT, None)
        assert time.monotonic() - published < 5  # woken, not the 30 s slice
        reason = server.get(contract.abort_reason_key(0, 3)).decode()
        assert reason == "failure: rank 1 lost"
        assert mon._on_notice is None  # unregistered once the wait ended
        # a decided step stays decided: the watcher's abort of step 4 loses to its commit
        commit2 = CommitProtocol(store_client(server), 1, [0], 0.02, mon.abort_check,
                                 on_notice=mon.on_notice, woken_poll_s=30.0)
        mon.watch(1, [0])
        assert commit2.vote(0, 4, {})[0] == COMMIT
        assert abort_step(server, 1, 4, "late") == COMMIT
    finally:
        mon.stop()


def test_watcher_fences_a_stalled_neighbour(server):
    mon = _monitor(server, 0, "notify", heartbeat_timeout_s=0.4)
    server.set(contract.heartbeat_key(1), "7")  # rank 1 beat once, then stopped
    mon.watch(0, [0, 1])
    mon.start_heartbeat()
    try:
        deadline = time.monotonic() + 10
        while mon.notice() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mon.notice()["suspects"] == [1]
        assert server.check([contract.fence_key(1)])
    finally:
        mon.stop()


def test_control_plane_is_validated():
    with pytest.raises(ValueError, match="control_plane"):
        MonitorConfig(control_plane="gossip")


def test_the_last_voter_reads_the_step_controls_once_for_every_rank(server):
    # Stop request, agreed stop step and inject count are read by the last voter only
    # and reach every rank in the decision; the totals are unchanged beside them.
    from odyssey import step_controls

    server.add(contract.INJECT_COUNT, 2)
    server.set(contract.STOP_REQUEST, "SIGTERM")
    calls: list[int] = []

    def read(store):
        calls.append(1)
        return step_controls.read(store)

    out: dict[int, tuple] = {}

    def vote(w: int) -> None:
        commit = CommitProtocol(store_client(server), 0, [0, 1, 2], control=read)
        got = commit.vote(w, 5, {"sumsq": float(w)}, totals=True)
        out[w] = (got, commit.last_control)

    threads = [threading.Thread(target=vote, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    want = {"stop": True, "stop_at": None, "inject": 2}
    assert out[0] == out[1] == out[2] == ((COMMIT, {"sumsq": 3.0, "overflow": False}), want)
    server.delete_key(contract.STOP_REQUEST)
    commit = CommitProtocol(store_client(server), 0, [0], control=read)
    assert commit.vote(0, 7, {}) == (COMMIT, None)  # no totals asked: none returned
    assert commit.last_control == {"stop": False, "stop_at": None, "inject": 2}
    # an aborted step carries none: ranks read the store themselves at the next boundary
    commit = CommitProtocol(store_client(server), 0, [0, 1, 2], control=read)
    abort_step(server, 0, 6, "test")
    assert commit.vote(0, 6, {}) == (ABORT, None) and commit.last_control is None

"""The supervision loop: keeps survivors, records exits, executes fences, handles signals.

Unlike torch's elastic agent, a worker exit never stops the others: it is recorded in
the store (``odyssey/exits/{rank}``) and the training runtime decides what happens next.
Control requests it serves (fences, replacement workers) must carry the job token's HMAC
(:mod:`odyssey.control`); others are ignored with one log line. Under the "node" control
plane it also reads its workers' node-local heartbeats, fences a hung one itself and
relays the store's notices to them (:mod:`launch.node_liveness`).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from launch.fence_watch import FenceWatch
from launch.node_liveness import NodePlane
from launch.node_watch import NodeWatcher
from launch.notice import announce_exits
from launch.replacements import SLOW_POLL_S, Replacements
from launch.store import SafeStore
from launch.workers import Worker, kill_leftovers, signal_group
from odyssey import contract
from odyssey.control import CommandGate, sign

log = logging.getLogger("launch")

_FENCE_REAP_WAIT_S = 2.0
"""How long a fence waits in line for the SIGKILLed process to be reaped. A process in
uninterruptible sleep can take longer; then ``fenced`` is written when the reaping loop
sees it die, never before."""

_FENCE_BACKSTOP_S = 1.0
"""How often the launcher looks at its ranks' fence keys even when no fence note came
(a fence request written without its bump and note, e.g. by an older client)."""



@dataclass(frozen=True)
class AgentConfig:
    """How the supervision loop behaves."""

    poll_interval_s: float = 0.1
    """Period of the loop: reaping exits, reading fence keys and the job status."""
    shutdown_timeout_s: float = 5.0
    """After forwarding SIGINT/SIGTERM, how long workers get before SIGKILL."""
    finish_grace_s: float = 60.0
    """Once ``odyssey/job/status`` is set, how long stragglers get before being stopped."""
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    """Signals that make the launcher forward them and shut the workers down."""
    beat_key: str | None = None
    """Counter to bump every ``beat_interval_s`` so other nodes (and ``odyssey store``)
    know this node lives (multi-node; None: no heartbeat)."""
    beat_interval_s: float = 0.25
    """Period of the node heartbeat; well under ``--node-timeout``."""
    node_rank: int = 0
    """This launcher's node (replacement requests name the node that starts them)."""
    rejoin_after_s: float | None = None
    """Request a replacement worker this long after a worker fails (None: never)."""
    token: str | None = None
    """The job token fence and spawn requests must be signed with (None: take them as
    they are, for a store nobody else can reach)."""
    stop_grace_s: float = 0.0
    """On the first handled signal, ask the workers to stop through the store
    (``odyssey/stop/request``: they checkpoint the last committed step and exit 0) and
    give them this long before the signal is forwarded (0: forward it at once)."""


@dataclass
class AgentResult:
    """What happened, for the exit status and the summary."""

    exits: dict[int, contract.ExitRecord]
    fenced: dict[int, str] = field(default_factory=dict)
    job_status: str | None = None
    received_signal: signal.Signals | None = None


class Agent:
    """Supervises this node's workers until all of them have exited."""

    def __init__(self, workers: Sequence[Worker], store: SafeStore, config: AgentConfig) -> None:
        self.workers = {w.rank: w for w in workers}
        self.store = store
        self.config = config
        self._fenced: dict[int, str] = {}
        self._fences_seen = -1  # FENCES_COUNT at the last look at the fence keys
        self._fences_checked = 0.0
        self._fence_watch: FenceWatch | None = None  # started by run()
        self._status_checked = 0.0  # the job status's last look
        self._fencing: dict[int, str] = {}  # SIGKILL sent, death not yet confirmed
        self._signal: signal.Signals | None = None
        self._job_status: str | None = None
        self._status_seen_at: float | None = None
        self._stopping_at: float | None = None  # SIGKILL deadline once stopping
        self._last_beat = 0.0
        self._spawner: Callable[[int, int], Worker] | None = None
        self._gate = CommandGate(config.token, log, f"node {config.node_rank} launcher")
        self._replacements = Replacements(store, config.token, config.node_rank, self._gate)
        self._watcher: NodeWatcher | None = None
        self._declared_lost = False
        self._forward_at: float | None = None  # stop requested: forward the signal then
        self._wake = threading.Event()  # set by a worker's waiter thread when it exits
        self._node_plane: NodePlane | None = None  # workers given a liveness directory
        for w in workers:
            self._watch_exit(w)
            self._watch_liveness(w)

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first handled signal received, if any."""
        return self._signal

    def add_worker(self, worker: Worker) -> None:
        """Supervise one more worker (called as each one is spawned)."""
        self.workers[worker.rank] = worker
        self._watch_exit(worker)
        self._watch_liveness(worker)

    def _watch_liveness(self, worker: Worker) -> None:
        """Read the node-local heartbeat files of workers given a liveness directory."""
        if worker.liveness_dir is None:
            return
        if self._node_plane is None:
            self._node_plane = NodePlane(worker.liveness_dir, self.store,
                                         self.config.node_rank)
        self._node_plane.add(worker.rank, worker.wake_fd)

    def _watch_exit(self, worker: Worker) -> None:
        """Wake the loop the moment `worker` dies (a blocking wait per worker instead of
        waiting out the poll period: the exit record is the survivors' fastest signal)."""
        proc = worker.proc
        if not isinstance(proc, subprocess.Popen):
            return

        def wait() -> None:
            try:
                proc.wait()
            finally:
                self._wake.set()

        threading.Thread(target=wait, name=f"reap-{worker.rank}", daemon=True).start()

    def enable_node_watch(self, watcher: NodeWatcher) -> None:
        """Watch the other nodes' heartbeats from this loop (multi-node)."""
        self._watcher = watcher

    def enable_spawning(self, spawner: Callable[[int, int], Worker]) -> None:
        """Let the agent start replacement workers: ``spawner(index, local_rank)`` starts
        the index-th replacement of the job."""
        self._spawner = spawner

    # -- signals -------------------------------------------------------------------
    def install_signal_handlers(self) -> Callable[[], None]:
        """Route the configured signals to this agent; returns a function restoring them."""
        previous = {s: signal.signal(s, self._on_signal) for s in self.config.signals}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only flag it: the loop does the work, so no store call runs inside a handler.
        if self._signal is not None:
            # Second signal: the user is impatient, stop waiting for a graceful exit.
            self._stopping_at = time.monotonic()
        self._signal = signal.Signals(signum)

    # -- main loop -----------------------------------------------------------------
    def run(self) -> AgentResult:
        """Loop until every worker has exited; returns what happened."""
        forwarded = False
        client = self.store.clone()
        if client is not None:
            self._fence_watch = FenceWatch(client, self._wake.set).start()
        while True:
            self._wake.clear()  # before reaping: a death after this wakes the next wait
            self._reap()
            if self._signal is not None and not forwarded:
                forwarded = True
                self._begin_stop(self._signal)
            if self._forward_at is not None and time.monotonic() >= self._forward_at:
                self._forward_at = None
                log.warning("workers still running %.0fs after the stop request: forwarding "
                            "%s, SIGKILL in %.1fs", self.config.stop_grace_s,
                            self._signal.name, self.config.shutdown_timeout_s)
                self._stop_all(self._signal)
            self._poll_fences()
            self._poll_job_status()
            self._poll_liveness()
            self._poll_spawns()
            self._enforce_deadline()
            self._beat()
            if self._watcher is not None:
                self._watcher.poll()
            if not any(w.alive for w in self.workers.values()):
                break
            self._wake.wait(self.config.poll_interval_s)
        # Fences requested in the last poll period still deserve an answer.
        self._poll_fences()
        if self._node_plane is not None:
            self._node_plane.stop()
        if self._fence_watch is not None:
            self._fence_watch.stop()
        return AgentResult(
            exits={r: w.exit for r, w in self.workers.items() if w.exit is not None},
            fenced=dict(self._fenced),
            job_status=self._job_status,
            received_signal=self._signal,
        )

    def _reap(self) -> None:
        for worker in self.workers.values():
            if worker.alive and worker.proc.poll() is not None:
                self._record_exit(worker)

    def _record_exit(self, worker: Worker) -> None:
        record = contract.ExitRecord.from_returncode(
            worker.rank, worker.pid, worker.proc.returncode, time.time()
        )
        worker.exit = record
        kill_leftovers(worker)
        # Record before counting, so whoever sees the count move can read the record.
        # A node declared lost already has "node lost" records; they stand.
        if not self._declared_lost:
            self.store.set(contract.exit_key(worker.rank), record.to_json())
            self.store.add(contract.EXITS_COUNT, 1)
            if record.exitcode != 0 or (self._node_plane is not None
                                        and self._job_status is None
                                        and self._node_plane.left_unannounced(worker.rank)):
                announce_exits(self.store, [worker.rank], f"exited ({record.describe()})",
                               f"launcher {self.config.node_rank}", record.time)
        if self._node_plane is not None:
            self._node_plane.drop(worker.rank)
        log.warning("rank %d (pid %d) %s", worker.rank, worker.pid, record.describe())
        if (record.exitcode != 0 and self.config.rejoin_after_s is not None
                and self._job_status is None):
            self._replacements.request_after(self.config.rejoin_after_s)
        if worker.rank in self._fencing:
            self._confirm_fence(worker.rank, self._fencing.pop(worker.rank))

    # -- node control plane ----------------------------------------------------------
    def _poll_liveness(self) -> None:
        """node plane: fence local workers whose heartbeat file stalled (the notice is
        published first, by NodePlane.hung)."""
        if self._node_plane is None or self._job_status is not None:
            return
        watched = [r for r, w in self.workers.items()
                   if w.alive and w.liveness_dir is not None and r not in self._fencing
                   and r not in self._fenced]
        for rank, reason in self._node_plane.hung(watched):
            self._fence(self.workers[rank], reason)

    # -- fencing -------------------------------------------------------------------
    def _poll_fences(self) -> None:
        """Fence requests for local ranks: the ranks' keys are read when the fence watch
        saw a request (without the watch: when FENCES_COUNT moved, one read per period),
        or once per `_FENCE_BACKSTOP_S`. At 1024 ranks a key check per rank per 20 ms
        period, then the counter read per period, were most of the launchers' store
        load (docs/BENCHMARKS.md, control-plane load)."""
        now = time.monotonic()
        backstop = now - self._fences_checked >= _FENCE_BACKSTOP_S
        watch = self._fence_watch
        if watch is not None and watch.alive:
            if not watch.take() and not backstop:
                return
        else:
            count = self.store.add(contract.FENCES_COUNT, 0)
            if count == self._fences_seen and not backstop:
                return
            self._fences_seen = count
        self._fences_checked = now
        for rank, worker in self.workers.items():
            if rank in self._fenced or rank in self._fencing:
                continue
            key = contract.fence_key(rank)
            if not self.store.check(key):
                continue
            reason = self._gate.open(key, self.store.get_text(key) or "")
            if reason is not None:
                self._fence(worker, reason)

    def _fence(self, worker: Worker, reason: str) -> None:
        if not worker.alive:
            # Already dead (and recorded): the fence holds trivially.
            self._confirm_fence(worker.rank, reason)
            return
        log.warning("fencing rank %d (pid %d): %s", worker.rank, worker.pid, reason or "-")
        self._fencing[worker.rank] = reason
        # SIGKILL also ends a SIGSTOPped process; the group takes its children along.
        signal_group(worker, signal.SIGKILL)
        try:
            worker.proc.wait(timeout=_FENCE_REAP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("rank %d not dead %.1fs after SIGKILL; fenced once reaped",
                      worker.rank, _FENCE_REAP_WAIT_S)
            return
        self._record_exit(worker)  # writes the exit record, then confirms the fence

    def _confirm_fence(self, rank: int, reason: str) -> None:
        self._fenced[rank] = reason
        body = json.dumps({"rank": rank, "time": time.time(), "reason": reason})
        self.store.set(contract.fenced_key(rank), body)

    # -- replacement workers -------------------------------------------------------
    def _poll_spawns(self) -> None:
        if self._spawner is None or self._job_status is not None:
            return
        for index, reason in self._replacements.poll():
            worker = self._spawner(index, len(self.workers))
            self.add_worker(worker)
            log.warning("started replacement worker rank %d (pid %d): %s", worker.rank,
                        worker.pid, reason)

    # -- endings -------------------------------------------------------------------
    def _begin_stop(self, sig: signal.Signals) -> None:
        # Only Odyssey trainers (they set the generation key) answer a stop request.
        if self.config.stop_grace_s <= 0 or not self.store.check(contract.GENERATION):
            log.warning("received %s: forwarding to workers, SIGKILL in %.1fs",
                        sig.name, self.config.shutdown_timeout_s)
            self._stop_all(sig)
            return
        self.store.set(contract.STOP_REQUEST, sign(self.config.token, contract.STOP_REQUEST,
                                                   sig.name))
        self._forward_at = time.monotonic() + self.config.stop_grace_s
        log.warning("received %s: workers checkpoint the last committed step and stop "
                    "(up to %.0fs; signal again to stop at once)", sig.name,
                    self.config.stop_grace_s)

    def _poll_job_status(self) -> None:
        now = time.monotonic()
        if self._job_status is not None or now - self._status_checked < SLOW_POLL_S:
            return
        self._status_checked = now
        if self.store.check(contract.JOB_STATUS):
            self._job_status = self.store.get_text(contract.JOB_STATUS)
            self._status_seen_at = time.monotonic()
            if any(w.alive for w in self.workers.values()):
                log.info("job status %r; waiting up to %.0fs for remaining workers",
                         self._job_status, self.config.finish_grace_s)

    def _enforce_deadline(self) -> None:
        now = time.monotonic()
        if (self._status_seen_at is not None and self._stopping_at is None
                and now - self._status_seen_at > self.config.finish_grace_s):
            log.warning("workers still running %.0fs after job status %r: stopping them",
                        self.config.finish_grace_s, self._job_status)
            self._stop_all(signal.SIGTERM)
        if self._stopping_at is not None and now >= self._stopping_at:
            for worker in self.workers.values():
                if worker.alive:
                    signal_group(worker, signal.SIGKILL)
            self._stopping_at = float("inf")  # sent once; reaping finishes the job

    def _stop_all(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.alive:
                signal_group(worker, sig)
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        self._stopping_at = min(self._stopping_at or deadline, deadline)

    def wait_for_nodes(self, nnodes: int, node_timeout_s: float) -> None:
        """Node 0 only: keep the store up until every node is done or has gone silent.

        A node is silent when its heartbeat counter has not moved for ``node_timeout_s``
        (counted on this clock, so clock skew between nodes does not matter). A signal
        ends the wait at once.
        """
        pending = set(range(1, nnodes))
        if pending:
            log.info("keeping the store up until node(s) %s are done", sorted(pending))
        last_beat = {n: -1 for n in pending}
        last_change = {n: time.monotonic() for n in pending}
        while pending and self._signal is None:
            for node in sorted(pending):
                if (self.store.check(contract.node_done_key(node))
                        or self.store.check(contract.node_lost_key(node))):
                    pending.discard(node)
                    continue
                beat = self.store.add(contract.node_beat_key(node), 0)
                now = time.monotonic()
                if beat != last_beat[node]:
                    last_beat[node], last_change[node] = beat, now
                elif now - last_change[node] > node_timeout_s:
                    log.error("node %d silent for %.0fs: no longer waiting for it",
                              node, node_timeout_s)
                    pending.discard(node)
            if self.store.lost:
                return
            if pending:
                time.sleep(max(self.config.poll_interval_s, 0.2))

    def _beat(self) -> None:
        now = time.monotonic()
        if self.config.beat_key is None or now - self._last_beat < self.config.beat_interval_s:
            return
        self._last_beat = now
        self.store.add(self.config.beat_key, 1)
        if not self._declared_lost and self.store.check(
                contract.node_lost_key(self.config.node_rank)):
            # We were cut off long enough for another watcher to write our ranks' exit
            # records; the survivors moved on without them, so they must not continue.
            self._declared_lost = True
            log.error("this node (%d) was declared lost while cut off from the store: "
                      "killing its workers", self.config.node_rank)
            for worker in self.workers.values():
                if worker.alive:
                    signal_group(worker, signal.SIGKILL)

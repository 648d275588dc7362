"""The launcher's half of the "node" control plane: local heartbeats, relayed notices.

With ``--monitor.control-plane node`` no worker heartbeats into the store or watches it.
Instead, on each node:

- every worker bumps a counter in a file of a node-local directory its launcher created
  (``ODYSSEY_LIVENESS_DIR``, on tmpfs where there is one); the launcher's supervision loop
  reads those files each period (:class:`LocalHeartbeats`) and treats a local worker
  whose counter has not moved for its ``heartbeat_timeout_s`` as hung: it publishes the
  generation's notice (the same record, compare-and-set, suspects ``[rank]``) and fences
  the worker itself, since it owns the process (SIGKILL, then the exit record and the
  fence confirmation as for any fence: the survivors' agreement waits for them);
- one thread per node (:class:`NoticeRelay`) blocks on the store's notice key of one
  generation after the other and writes each notice into the directory, where the
  workers' watcher threads find it with a local open.

Whole-node loss stays launch/node_watch.py's job (one heartbeat per node in the store).
Workers that never write a heartbeat file (another control plane) cost nothing here: the
relay starts only once a local worker beats.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from launch.notice import announce_exits
from launch.store import SafeStore
from odyssey import contract
from odyssey.liveness_files import read_beat, read_info, write_notice

log = logging.getLogger("launch")

_RELAY_WAIT_S = 2.0
"""The relay's blocking wait is cut into pieces this long, so it can notice a stop."""
_CHECK_S = 0.1
"""How often the launcher reads its workers' heartbeat files (a hang takes seconds)."""
_DEFAULT_TIMEOUT_S = 3.0
"""Allowed stall of a worker that has not said its own (monitor.heartbeat_timeout_s)."""


def make_liveness_dir() -> str:
    """A fresh node-local directory for this launcher's workers (tmpfs if the node has
    one: the workers' beats then never touch a disk)."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="odyssey-liveness-", dir=base)


def remove_liveness_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


class LocalHeartbeats:
    """Reads the local workers' heartbeat files; says which ones stalled."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._seen: dict[int, tuple[bytes, float]] = {}  # rank -> (counter, changed at)
        self._timeout_s: dict[int, float] = {}

    def timeout_s(self, rank: int) -> float:
        """How long `rank` may stall (what its monitor wrote, else the default)."""
        if rank not in self._timeout_s:
            info = read_info(self.directory, rank) or {}
            self._timeout_s[rank] = float(info.get("heartbeat_timeout_s", _DEFAULT_TIMEOUT_S))
        return self._timeout_s[rank]

    def beating(self, rank: int) -> bool:
        """`rank` runs the node plane and has not stopped its monitor."""
        return read_beat(self.directory, rank) is not None

    def stalled(self, ranks: Iterable[int], now: float | None = None
                ) -> list[tuple[int, float]]:
        """(rank, seconds silent) of those of `ranks` whose counter has not moved for
        longer than their timeout; timed on this clock, from the first read."""
        now = time.monotonic() if now is None else now
        out = []
        for rank in ranks:
            beat = read_beat(self.directory, rank)
            if beat is None:  # not started, or its monitor stopped on purpose
                self._seen.pop(rank, None)
                continue
            prev = self._seen.get(rank)
            if prev is None or prev[0] != beat:
                self._seen[rank] = (beat, now)
            elif now - prev[1] > self.timeout_s(rank):
                out.append((rank, now - prev[1]))
        return out

    def forget(self, rank: int) -> None:
        """Stop timing `rank` (fenced or exited)."""
        self._seen.pop(rank, None)


class NoticeRelay:
    """One thread per node: relays generation 0's notice, then 1's, ... from the store to
    the node-local directory. A generation ends only after a notice, so waiting for the
    notices in order follows the job without reading which generation it is in."""

    def __init__(self, store: Any, directory: str, wait_s: float = _RELAY_WAIT_S,
                 on_relayed: Callable[[], None] = lambda: None) -> None:
        """``store``: a client of its own (a blocking wait holds it). ``on_relayed``:
        called after each notice is written (wakes the workers)."""
        self.store = store
        self.directory = directory
        self.wait_s = wait_s
        self.on_relayed = on_relayed
        self.relayed = 0
        """Generations relayed so far (the next one waited for)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notice-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (at its next wake-up; it is a daemon)."""
        self._stop.set()

    def _run(self) -> None:
        # torch is imported lazily in the launcher (launch/store.py); it is loaded by now
        from torch.distributed import DistStoreError

        while not self._stop.is_set():
            key = contract.notice_key(self.relayed)
            try:
                self.store.wait([key], timedelta(seconds=self.wait_s))
                record = json.loads(self.store.get(key))
            except DistStoreError:
                continue  # no notice yet: wait again
            except Exception as e:  # noqa: BLE001 - the store is gone: nothing to relay
                log.debug("notice relay ends: %s", e)
                return
            try:
                write_notice(self.directory, record)
            except OSError as e:  # the directory was removed: the launcher is ending
                log.debug("notice relay ends: %s", e)
                return
            self.relayed += 1
            self.on_relayed()


class NodePlane:
    """One launcher's node control plane: its workers' heartbeat files, and the relay
    (started once a local worker beats: other control planes never pay for it)."""

    def __init__(self, directory: str, store: SafeStore, node_rank: int) -> None:
        self.heartbeats = LocalHeartbeats(directory)
        self.store = store
        self.node_rank = node_rank
        self.relay: NoticeRelay | None = None
        self._wake_fds: dict[int, int] = {}  # rank -> write end of its wake-up pipe
        self._lock = threading.Lock()  # the relay thread wakes, the agent adds and drops
        self._last_check = float("-inf")

    def add(self, rank: int, wake_fd: int | None) -> None:
        """A local worker, with the write end of its wake-up pipe if it has one."""
        if wake_fd is not None:
            with self._lock:
                self._wake_fds[rank] = wake_fd

    def drop(self, rank: int) -> None:
        """`rank` exited: close its wake-up pipe."""
        with self._lock:
            fd = self._wake_fds.pop(rank, None)
        if fd is not None:
            os.close(fd)

    def wake_all(self) -> None:
        """One byte into every local worker's pipe: its watcher reads the notice file."""
        with self._lock:
            for fd in self._wake_fds.values():
                try:
                    os.write(fd, b"n")
                except (BlockingIOError, BrokenPipeError):
                    pass  # a full pipe wakes anyway; a dead worker is dropped when reaped

    def hung(self, ranks: list[int]) -> list[tuple[int, str]]:
        """(rank, fence reason) of the local `ranks` whose heartbeat stalled; the notice
        naming each is published before this returns, so survivors start agreeing while
        the caller fences it."""
        now = time.monotonic()
        if now - self._last_check < _CHECK_S:
            return []
        self._last_check = now
        hb = self.heartbeats
        if self.relay is None and any(hb.beating(r) for r in ranks):
            client = self.store.clone()
            if client is not None:
                self.relay = NoticeRelay(client, hb.directory, on_relayed=self.wake_all)
                self.relay.start()
        out = []
        for rank, silent_s in hb.stalled(ranks, now):
            timeout_s = hb.timeout_s(rank)
            hb.forget(rank)
            log.error("rank %d: heartbeat stalled %.1fs (> %.1fs): hung", rank, silent_s,
                      timeout_s)
            announce_exits(self.store, [rank], f"stopped heartbeating for {silent_s:.1f}s",
                           f"launcher {self.node_rank}", time.time())
            out.append((rank, f"heartbeat stalled > {timeout_s}s"))
        return out

    def left_unannounced(self, rank: int) -> bool:
        """A worker that exited with its heartbeat still on (it never stopped its
        monitor: it left mid-job): announce even a clean exit, since no rank reads the
        exit count under this plane."""
        return self.heartbeats.beating(rank)

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for rank in list(self._wake_fds):
            self.drop(rank)

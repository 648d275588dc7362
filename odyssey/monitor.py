"""Failure monitor: three signals, whichever comes first, turned into one notice.

1. the launcher's record of a worker exit (`odyssey/exits/{rank}`),
2. a communication error seen by this rank (reported through `report_error`),
3. a member whose heartbeat counter stops moving (a hung rank, e.g. SIGSTOP).

The first rank to see one publishes `odyssey/gen{g}/notice` (compare-and-set, so one
notice per generation); the launcher publishes it too when it records an exit. With the
default control plane ("notify") one watcher thread per rank blocks on that key in the
store and raises a local flag, so a rank waiting on communication learns of it without
a store round trip; the watcher also checks one neighbour's heartbeat (each member is
watched by its predecessor in the ring) and the exit count, a few requests per second per
rank. The "node" control plane keeps per-rank liveness traffic on the node: a rank's
heartbeat is a counter in a node-local file its launcher reads (the launcher fences a
local rank that stalls and publishes the notice), and the launcher relays each notice
from the store into a node-local file the watcher thread reads when the launcher's pipe
wakes it; only the votes stay per rank (odyssey/liveness_files.py,
launch/node_liveness.py). The old control plane ("poll") asks the store every `poll_s`
from every waiting rank and reads every member's heartbeat: kept as a switch for
comparison (benchmarks/mttr.py, benchmarks/store_load.py). Timeouts form a hierarchy:
heartbeat < collective op < launcher fence timeout. Fence requests are signed with the
job token (:mod:`odyssey.control`): a launcher ignores one that is not.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract
from odyssey.commit import NoticeAction
from odyssey.control import sign, token_from_env, verify
from odyssey.liveness_files import BeatFile, read_notice

CONTROL_PLANES = ("notify", "poll", "node")


@dataclass(frozen=True)
class MonitorConfig:
    """Failure detection and agreement timing."""

    heartbeat_s: float = 0.2
    """Period of each rank's heartbeat."""
    heartbeat_timeout_s: float = 3.0
    """A member whose heartbeat stalls this long is declared hung (and fenced)."""
    poll_s: float = 0.02
    """How often a rank waiting on communication checks for a notice."""
    join_timeout_s: float = 6.0
    """Agreement on the next generation: how long survivors wait for a silent member (no
    exit record, not joining) before fencing it and going on without it."""
    fence_timeout_s: float = 10.0
    """How long survivors wait for a launcher to confirm it killed a fenced rank before
    going on anyway (a lost node's ranks are confirmed by its --node-timeout instead)."""
    control_plane: str = "notify"
    """How ranks learn of a notice: "notify" (one watcher thread per rank blocks on the
    notice key; waits check a local flag; one neighbour's heartbeat is read), "node"
    (heartbeats and notices go through node-local files the rank's launcher reads and
    writes: no per-rank liveness traffic in the store; needs `odyssey run` with local
    worker processes) or "poll" (every waiting rank asks the store every poll_s and reads
    all heartbeats: the old design, kept for comparison)."""
    local_poll_s: float = 0.002
    """notify and node: how often a rank waiting on communication looks at the local
    flag (no store traffic); node without the launcher's wake-up pipe: also how often the
    watcher looks for the relayed notice file."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "heartbeat_timeout_s", "poll_s", "join_timeout_s",
                     "fence_timeout_s", "local_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"monitor.{name} must be > 0, got {getattr(self, name)}")
        if self.control_plane not in CONTROL_PLANES:
            raise ValueError(f"monitor.control_plane must be one of {CONTROL_PLANES}, "
                             f"got {self.control_plane!r}")

    @property
    def notify(self) -> bool:
        """Notices arrive as a local flag set by a watcher thread ("notify" and "node")."""
        return self.control_plane in ("notify", "node")


class FailureMonitor:
    """Watches one generation's members on behalf of one rank."""

    def __init__(self, store: dist.Store, rank: int, cfg: MonitorConfig | None = None,
                 store_factory: Callable[[], dist.Store] | None = None,
                 token: str | None = None, liveness_dir: str | None = None):
        """``token``: the job token fence requests are signed with (default: the one the
        launcher exported; none outside `odyssey run`). ``liveness_dir``: the node-local
        directory of the "node" control plane (default: the one the launcher exported)."""
        self.store = store
        self.token = token if token is not None else token_from_env()
        self.rank = rank
        self.cfg = cfg or MonitorConfig()
        self.liveness_dir = liveness_dir or os.environ.get(contract.ENV_LIVENESS_DIR)
        wake = os.environ.get(contract.ENV_LIVENESS_WAKE_FD)
        self._wake_fd = int(wake) if wake and self.cfg.control_plane == "node" else None
        if self.cfg.control_plane == "node" and not self.liveness_dir:
            raise ValueError(
                "monitor.control_plane 'node' needs a launcher beside the workers that "
                f"reads their heartbeats (`odyssey run`, local processes: it sets "
                f"{contract.ENV_LIVENESS_DIR}); use 'notify' here")
        self.store_factory = store_factory
        self.generation = 0
        self.members: list[int] = []
        self.dead: set[int] = set()
        self._exits_seen = 0
        self._beats: dict[int, tuple[int, float]] = {}
        self._last_hb_check = 0.0
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._beat_file: BeatFile | None = None
        self._watcher: threading.Thread | None = None
        self._gen_changed = threading.Event()
        self._seen: dict | None = None  # notify: the notice the watcher saw (any generation)
        self._on_notice: NoticeAction | None = None
        self._wake_store: dist.Store | None = None  # node: the watcher's idle client
        self.noticed_at: dict[int, float] = {}
        """Wall time this rank learned of each generation's notice."""

    # ---- heartbeat -----------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Bump `odyssey/hb/{rank}` every heartbeat_s from a thread with its own client
        (node: the rank's heartbeat file, and watch the relayed notice files)."""
        if self._hb_thread is not None:
            return
        if self.cfg.control_plane == "node":
            self._start_node_plane()
            return
        if self.store_factory is None:
            return
        store = self.store_factory()
        key = contract.heartbeat_key(self.rank)

        def beat() -> None:
            while not self._stop.wait(self.cfg.heartbeat_s):
                try:
                    store.add(key, 1)
                except Exception:  # noqa: BLE001 - the store host is gone; nothing to do
                    return

        store.add(key, 1)
        self._hb_thread = threading.Thread(target=beat, name=f"heartbeat-{self.rank}",
                                           daemon=True)
        self._hb_thread.start()
        if self.cfg.notify:
            self._watcher = threading.Thread(target=self._watch_loop, args=(self.store_factory(),),
                                             name=f"notice-watcher-{self.rank}", daemon=True)
            self._watcher.start()

    def _start_node_plane(self) -> None:
        """node: beat into the node-local file, watch for the launcher's notice files."""
        self._beat_file = beat = BeatFile(self.liveness_dir, self.rank,
                                          self.cfg.heartbeat_timeout_s)

        def beat_loop() -> None:
            while not self._stop.wait(self.cfg.heartbeat_s):
                try:
                    beat.beat()
                except OSError:  # closed by stop(), or the directory is gone
                    return

        self._hb_thread = threading.Thread(target=beat_loop, name=f"heartbeat-{self.rank}",
                                           daemon=True)
        self._hb_thread.start()
        if self.store_factory is not None:
            # an idle connection (no requests) to abort the decision a rank blocks on
            # when a notice is relayed, so votes need no short wait slices here either
            self._wake_store = self.store_factory()
        self._watcher = threading.Thread(target=self._watch_files,
                                         name=f"notice-watcher-{self.rank}", daemon=True)
        self._watcher.start()

    def _watch_files(self) -> None:
        """node: look for the current generation's relayed notice (a node-local file; no
        store request) each time the launcher's wake-up pipe says it relayed one, or
        every local_poll_s without a pipe."""
        wake = self._wake_fd
        while not self._stop.is_set():
            gen = self.generation
            record = read_notice(self.liveness_dir, gen)
            if record is None:
                if wake is None:
                    self._stop.wait(self.cfg.local_poll_s)
                    continue
                try:  # blocks (without the GIL) until the next relayed notice
                    woke = os.read(wake, 4096)
                except OSError:
                    woke = b""
                if not woke:  # the launcher closed it: look at the file instead
                    wake = None
                continue
            try:
                self._deliver(self._wake_store, record)
            except Exception:  # noqa: BLE001 - the store host is gone: waits time out
                pass
            while self.generation == gen and not self._stop.is_set():
                self._gen_changed.wait(0.5)
                self._gen_changed.clear()

    @property
    def wakes_decisions(self) -> bool:
        """A notice's watcher aborts the decision its rank blocks on (notify; node with a
        store client): the commit protocol then needs no short wait slices."""
        if self._watcher is None:
            return False
        return self.cfg.control_plane == "notify" or self._wake_store is not None

    @property
    def notified(self) -> bool:
        """True when a watcher thread delivers notices (no store polling needed)."""
        return self._watcher is not None

    def _watch_loop(self, store: dist.Store) -> None:
        """notify: block on the current generation's notice key; on each timeout (the
        check period) look at the exit count and one neighbour's heartbeat."""
        period = timedelta(seconds=min(0.5, self.cfg.heartbeat_timeout_s / 4))
        exits_seen, beat = 0, (None, 0.0)
        while not self._stop.is_set():
            gen = self.generation
            key = contract.notice_key(gen)
            try:
                store.wait([key], period)
                record = json.loads(store.get(key))
                self._deliver(store, record)
                while self.generation == gen and not self._stop.is_set():
                    self._gen_changed.wait(0.5)
                    self._gen_changed.clear()
                continue
            except dist.DistStoreError:
                pass  # the period passed without a notice
            except Exception:  # noqa: BLE001 - the store host is gone; nothing to watch
                return
            try:
                members = list(self.members)
                count = store.add(contract.EXITS_COUNT, 0)
                if count != exits_seen:
                    exits_seen = count
                    gone = [r for r in members
                            if store.check([contract.exit_key(r)])]
                    if gone:
                        self._publish_on(store, "failure", f"rank(s) {gone} exited", gone, gen)
                        continue
                beat = self._check_neighbour(store, members, gen, beat)
            except Exception:  # noqa: BLE001
                return

    def _check_neighbour(self, store: dist.Store, members: list[int], gen: int,
                         beat: tuple) -> tuple:
        """Each member watches its successor's heartbeat: one read per period per rank,
        and every member is watched by someone."""
        if self.rank not in members or len(members) < 2:
            return (None, 0.0)
        nxt = members[(members.index(self.rank) + 1) % len(members)]
        key = contract.heartbeat_key(nxt)
        if not store.check([key]):
            return (None, 0.0)
        now = time.monotonic()
        v = int(store.get(key))
        if beat[0] != (nxt, v):
            return ((nxt, v), now)
        if now - beat[1] > self.cfg.heartbeat_timeout_s:
            self._fence_on(store, nxt, f"heartbeat stalled > {self.cfg.heartbeat_timeout_s}s")
            self._publish_on(store, "failure", f"rank(s) [{nxt}] stopped heartbeating",
                             [nxt], gen)
        return beat

    def _saw(self, record: dict) -> None:
        self._seen = record
        self.noticed_at.setdefault(record["gen"], time.time())

    def _deliver(self, store: dist.Store | None, record: dict) -> None:
        """The watcher saw `record`: set the flag, then run the registered action with
        the watcher's own client (in this order: see on_notice)."""
        self._saw(record)
        act = self._on_notice
        if act is not None and store is not None:
            act(store, record)

    def on_notice(self, act: NoticeAction | None) -> None:
        """notify and node (see wakes_decisions): run `act(store, notice)` in the watcher
        thread, with its own store client, when a notice arrives, until set back to
        None; a notice that came before is not replayed. The commit protocol aborts the
        decision its rank blocks on with it, so waiters wake on the notice instead of
        re-asking the store in short slices.
        Set it before looking at `abort_check` (the watcher sets the flag before it looks
        at this): a notice is then seen by one or both, never missed."""
        self._on_notice = act

    def stop(self) -> None:
        self._stop.set()
        self._gen_changed.set()
        if self._beat_file is not None:  # node: tell the launcher this silence is meant
            self._beat_file.close()

    # ---- generation ----------------------------------------------------------------
    def watch(self, generation: int, members: list[int]) -> None:
        self.generation = generation
        self.members = sorted(members)
        self._beats = {}
        self._last_hb_check = time.monotonic()
        self._gen_changed.set()

    def notice(self) -> dict | None:
        """The notice of the current generation, if one was published (notify: what the
        watcher saw, no store round trip)."""
        if self.notified:
            seen = self._seen
            return seen if seen is not None and seen["gen"] == self.generation else None
        key = contract.notice_key(self.generation)
        if self.store.check([key]):
            return self._note(json.loads(self.store.get(key)))
        return None

    def _note(self, record: dict) -> dict:
        self.noticed_at.setdefault(record["gen"], time.time())
        return record

    def publish(self, kind: str, reason: str, suspects: list[int] | None = None,
                generation: int | None = None) -> dict:
        """Publish a notice (first one wins); return the notice that stands."""
        gen = self.generation if generation is None else generation
        return self._note(self._publish_on(self.store, kind, reason, suspects, gen))

    def _publish_on(self, store: dist.Store, kind: str, reason: str,
                    suspects: list[int] | None, gen: int) -> dict:
        record = {"kind": kind, "reason": reason, "suspects": sorted(suspects or []),
                  "by": self.rank, "gen": gen, "time": time.time()}
        won = json.loads(store.compare_set(contract.notice_key(gen), "", json.dumps(record)))
        if self.notified and won["gen"] == self.generation:
            self._saw(won)
        return won

    # ---- checks --------------------------------------------------------------------
    def exited_members(self) -> set[int]:
        """Members with an exit record (asks the store only when the exit count moved)."""
        count = self.store.add(contract.EXITS_COUNT, 0)
        if count != self._exits_seen:
            self._exits_seen = count
            for r in self.members:
                if r not in self.dead and self.store.check([contract.exit_key(r)]):
                    self.dead.add(r)
        return self.dead & set(self.members)

    def stalled_members(self) -> list[int]:
        """Members whose heartbeat has not moved for heartbeat_timeout_s."""
        now = time.monotonic()
        others = [r for r in self.members if r != self.rank and r not in self.dead]
        if not others:
            return []
        hb_keys = [contract.heartbeat_key(r) for r in others]
        if not self.store.check(hb_keys):  # someone has not started beating yet
            return []
        values = self.store.multi_get(hb_keys)
        stalled = []
        for r, raw in zip(others, values):
            v = int(raw)
            prev = self._beats.get(r)
            if prev is None or prev[0] != v:
                self._beats[r] = (v, now)
            elif now - prev[1] > self.cfg.heartbeat_timeout_s:
                stalled.append(r)
        return stalled

    def abort_check(self) -> str | None:
        """Called by waiting ranks every poll_s: a reason to abandon the wait, or None.
        notify: only the local flag (the watcher thread does the store work)."""
        n = self.notice()
        if self.notified:
            return f"{n['kind']}: {n['reason']}" if n is not None else None
        if n is not None:
            return f"{n['kind']}: {n['reason']}"
        dead = self.exited_members()
        if dead:
            n = self.publish("failure", f"rank(s) {sorted(dead)} exited", sorted(dead))
            return f"{n['kind']}: {n['reason']}"
        now = time.monotonic()
        if self.store_factory is not None and now - self._last_hb_check >= 0.5:
            self._last_hb_check = now
            hung = self.stalled_members()
            if hung:
                for r in hung:
                    self.fence(r, f"heartbeat stalled > {self.cfg.heartbeat_timeout_s}s")
                n = self.publish("failure", f"rank(s) {hung} stopped heartbeating", hung)
                return f"{n['kind']}: {n['reason']}"
        return None

    def fence(self, rank: int, reason: str) -> None:
        """Ask the launcher to kill `rank` (idempotent; the first valid reason stands)."""
        self._fence_on(self.store, rank, reason)

    def _fence_on(self, store: dist.Store, rank: int, reason: str) -> None:
        key = contract.fence_key(rank)
        value = sign(self.token, key, reason)
        standing = store.compare_set(key, "", value).decode()
        if standing != value and verify(self.token, key, standing) is None:
            store.set(key, value)  # a forged value must not block the real fence
        k = store.add(contract.FENCES_COUNT, 1)
        store.set(contract.fence_note_key(k), str(rank))  # wakes every launcher's watch

    def fenced_or_exited(self, rank: int) -> bool:
        return bool(self.store.check([contract.fenced_key(rank)]) or
                    self.store.check([contract.exit_key(rank)]))

"""Failure monitor: three signals, whichever comes first, turned into one notice.

1. the launcher's record of a worker exit (`odyssey/exits/{rank}`),
2. a communication error seen by this rank (reported through `report_error`),
3. a member whose heartbeat counter stops moving (a hung rank, e.g. SIGSTOP).

The first rank to see one publishes `odyssey/gen{g}/notice` (compare-and-set, so one
notice per generation). Every rank polls for it while it waits on communication, so no
survivor sits in a timeout. Timeouts form a hierarchy: heartbeat < collective op <
launcher fence timeout. Fence requests are signed with the job token
(:mod:`odyssey.control`): a launcher ignores one that is not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from odyssey import contract
from odyssey.control import sign, token_from_env, verify


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

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "heartbeat_timeout_s", "poll_s", "join_timeout_s",
                     "fence_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"monitor.{name} must be > 0, got {getattr(self, name)}")


class FailureMonitor:
    """Watches one generation's members on behalf of one rank."""

    def __init__(self, store: dist.Store, rank: int, cfg: MonitorConfig | None = None,
                 store_factory: Callable[[], dist.Store] | None = None,
                 token: str | None = None):
        """``token``: the job token fence requests are signed with (default: the one the
        launcher exported; none outside `odyssey run`)."""
        self.store = store
        self.token = token if token is not None else token_from_env()
        self.rank = rank
        self.cfg = cfg or MonitorConfig()
        self.store_factory = store_factory
        self.generation = 0
        self.members: list[int] = []
        self.dead: set[int] = set()
        self._exits_seen = 0
        self._beats: dict[int, tuple[int, float]] = {}
        self._last_hb_check = 0.0
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    # ---- heartbeat -----------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Bump `odyssey/hb/{rank}` every heartbeat_s from a thread with its own client."""
        if self._hb_thread is not None or self.store_factory is None:
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

    def stop(self) -> None:
        self._stop.set()

    # ---- generation ----------------------------------------------------------------
    def watch(self, generation: int, members: list[int]) -> None:
        self.generation = generation
        self.members = sorted(members)
        self._beats = {}
        self._last_hb_check = time.monotonic()

    def notice(self) -> dict | None:
        """The notice of the current generation, if one was published."""
        key = contract.notice_key(self.generation)
        if self.store.check([key]):
            return json.loads(self.store.get(key))
        return None

    def publish(self, kind: str, reason: str, suspects: list[int] | None = None,
                generation: int | None = None) -> dict:
        """Publish a notice (first one wins); return the notice that stands."""
        gen = self.generation if generation is None else generation
        record = {"kind": kind, "reason": reason, "suspects": sorted(suspects or []),
                  "by": self.rank, "gen": gen, "time": time.time()}
        won = self.store.compare_set(contract.notice_key(gen), "", json.dumps(record))
        return json.loads(won)

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
        """Called by waiting ranks every poll_s: a reason to abandon the wait, or None."""
        n = self.notice()
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
        key = contract.fence_key(rank)
        value = sign(self.token, key, reason)
        standing = self.store.compare_set(key, "", value).decode()
        if standing != value and verify(self.token, key, standing) is None:
            self.store.set(key, value)  # a forged value must not block the real fence

    def fenced_or_exited(self, rank: int) -> bool:
        return bool(self.store.check([contract.fenced_key(rank)]) or
                    self.store.check([contract.exit_key(rank)]))

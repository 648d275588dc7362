"""Lost-node detection: node heartbeats in the store, and the watcher that reads them.

Every launcher of a multi-node job bumps ``odyssey/nodes/{n}/beat`` a few times a second.
Every other launcher -- and ``odyssey store`` when the store lives apart -- watches those
counters. A node whose counter has not moved for ``node_timeout_s`` (timed on the
watcher's own clock, so clocks need not agree) is declared lost by exactly one watcher:
the one whose compare-and-set on ``odyssey/nodes/{n}/lost`` wins. That watcher writes an
exit record ("node lost") and a fence confirmation for each of the node's ranks that has
no exit record yet, so survivors recover exactly as after a process death instead of
waiting out the agreement's join and fence timeouts.

Treating those fences as satisfied is safe because a rank that cannot reach the store
cannot vote, so no step commits without the survivors, and the new generation is fixed
without it (a declared-dead rank that reaches the store again is refused, see
``odyssey.membership``); a launcher that reaches the store again and finds its node
declared lost kills its own workers (:meth:`launch.agent.Agent`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from launch.notice import announce_exits
from launch.store import SafeStore
from odyssey import contract

log = logging.getLogger("launch")

NODE_LOST_EXITCODE = 255
"""``exitcode`` of an exit record written for a rank whose whole node was lost (its
``signal`` is None and ``node_lost`` names the node, so it never reads as a signal)."""


@dataclass(frozen=True)
class NodeWatchConfig:
    """How often nodes beat and how long a silent node is given."""

    node_timeout_s: float = 5.0
    """A node whose heartbeat counter has not moved for this long is declared lost."""
    beat_interval_s: float = 0.25
    """How often each launcher bumps its node's heartbeat counter."""
    check_interval_s: float = 0.25
    """How often a watcher reads the other nodes' counters."""
    peers: int = 2
    """How many nodes one watcher watches: the first of its `nodes` (a launcher: the
    next ones in ring order after its own) that are neither declared lost nor finished,
    so every node has `peers` watchers and a launcher's reads do not grow with the job
    (every launcher reading every node was nodes x nodes requests). 0: all of them
    (`odyssey store`)."""


def publish_job(store: SafeStore, nnodes: int, world_size: int, node_timeout_s: float) -> None:
    """Tell watchers that do not know the job (``odyssey store``) what to watch."""
    store.set(contract.NODES_CONFIG, json.dumps(
        {"nnodes": nnodes, "world_size": world_size, "node_timeout_s": node_timeout_s}))


def read_job(store: SafeStore) -> dict | None:
    """What :func:`publish_job` wrote, or None before any launcher has started."""
    if not store.check(contract.NODES_CONFIG):
        return None
    text = store.get_text(contract.NODES_CONFIG)
    return json.loads(text) if text else None


@dataclass
class NodeWatcher:
    """Watches the heartbeats of ``nodes`` and declares silent ones lost (see module doc)."""

    store: SafeStore
    nodes: list[int]
    world_size: int
    config: NodeWatchConfig = field(default_factory=NodeWatchConfig)
    who: str = "watcher"
    """Named in the declaration, for the logs (e.g. ``node 1`` or ``odyssey store``)."""
    declared: dict[int, dict] = field(default_factory=dict)
    """Nodes this watcher saw declared lost (by itself or another watcher)."""
    _seen: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    _started: set[int] = field(default_factory=set)
    _done: set[int] = field(default_factory=set)
    _last_check: float = float("-inf")

    def watched(self) -> list[int]:
        """The nodes this watcher reads now (see NodeWatchConfig.peers)."""
        live = [n for n in self.nodes if n not in self.declared and n not in self._done]
        return live[:self.config.peers] if self.config.peers > 0 else live

    def poll(self, now: float | None = None) -> list[int]:
        """Check once (rate-limited to ``check_interval_s``); returns nodes declared now
        by this watcher. Nodes that are done, or already declared, are not watched. In
        steady state one read per watched node: whether it started is asked until it
        has, whether it finished only once its counter stops moving."""
        now = time.monotonic() if now is None else now
        if now - self._last_check < self.config.check_interval_s:
            return []
        self._last_check = now
        if self.store.check(contract.JOB_STATUS):
            return []  # the job is over: nodes stop beating as they finish
        mine = []
        for node in self.watched():
            key = contract.node_beat_key(node)
            if node not in self._started:
                if not self.store.check(key):
                    continue  # not started yet: rendezvous or spawning is still under way
                self._started.add(node)
            beat = self.store.add(key, 0)
            prev = self._seen.get(node)
            if prev is None or prev[0] != beat:
                self._seen[node] = (beat, now, time.time())
                continue
            if now - prev[1] <= self.config.node_timeout_s:
                continue
            if self.store.check(contract.node_done_key(node)):
                self._done.add(node)  # it finished and stopped beating: not lost
                continue
            if self._declare(node, silent_s=now - prev[1], last_beat_wall=prev[2]):
                mine.append(node)
        return mine

    def _declare(self, node: int, silent_s: float, last_beat_wall: float) -> bool:
        record = {"node": node, "by": self.who, "time": time.time(),
                  "last_beat": last_beat_wall, "silent_s": round(silent_s, 3)}
        won = self.store.compare_set(contract.node_lost_key(node), "", json.dumps(record))
        if won is None:
            return False  # store lost: nothing can be declared
        self.declared[node] = json.loads(won)
        if self.declared[node] != record:
            return False  # another watcher was first; it writes the records
        ranks = self.record_ranks(node, last_beat_wall)
        log.error("node %d silent for %.1fs (> --node-timeout %.1fs): declared lost; exit "
                  "records written for rank(s) %s", node, silent_s,
                  self.config.node_timeout_s, ranks)
        return True

    def ranks_of(self, node: int) -> list[int]:
        """Ranks started on ``node`` (its launcher's ``odyssey/workers/{rank}`` records)."""
        total = self.world_size + self.store.add(contract.NEXT_RANK, 0)
        ranks = []
        for rank in range(total):
            key = contract.worker_key(rank)
            text = self.store.get_text(key) if self.store.check(key) else None
            if text and json.loads(text).get("node") == node:
                ranks.append(rank)
        return ranks

    def record_ranks(self, node: int, when: float) -> list[int]:
        """Exit record + fence confirmation for each rank of ``node`` without a record.

        ``when`` (the wall time the node was last seen beating) is the record's time, so
        MTTR counts from about when the node died, not from when it was declared.
        """
        done = []
        for rank in self.ranks_of(node):
            if self.store.check(contract.exit_key(rank)):
                continue  # its launcher recorded a real exit before the node went
            text = self.store.get_text(contract.worker_key(rank)) or "{}"
            record = contract.ExitRecord(rank, int(json.loads(text).get("pid", -1)),
                                         NODE_LOST_EXITCODE, None, when, node_lost=node)
            # Record before counting, as the agent does: whoever sees the count move
            # finds the record.
            self.store.set(contract.exit_key(rank), record.to_json())
            self.store.add(contract.EXITS_COUNT, 1)
            self.store.set(contract.fenced_key(rank), json.dumps(
                {"rank": rank, "time": time.time(), "reason": f"node {node} lost"}))
            done.append(rank)
        announce_exits(self.store, done, f"lost with node {node}", "node watcher", when)
        return done

"""The store traffic of each control plane, as data both load generators replay.

benchmarks/store_load.py has two generators: Python threads (store_load_py.py, the
reference at small N) and a compiled one (store_load_gen.cpp, through store_load_cpp.py)
that can offer the load of 1024 ranks on a 2-core machine. Neither spells a key or a rate
of its own: each simulated client (a rank, a node's launcher, a node's notice relay)
runs the periodic requests of its `Plane` below, and the three procedures with control
flow (the step's vote, learning of the notice, the agreement) are written once in Python
here (`vote`, `learn_notice`, `agree`) and mirrored line by line in store_load_gen.h,
parametrised by the same `Plane` fields. Keys come from odyssey/contract.py: per client
through `slot_keys`, per step and generation through `Templates`.

The traffic is the runtime's own (odyssey/monitor.py, membership.py, commit.py,
launch/supervise.py); see store_load.py's docstring for what each plane is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Protocol

from launch.fence_watch import SLICE_S as FENCE_WATCH_S
from launch.node_watch import NodeWatchConfig
from launch.replacements import SLOW_POLL_S
from odyssey import contract
from odyssey.commit import WOKEN_POLL_S

HEARTBEAT_S = 0.2
"""monitor: a rank's heartbeat `add` period (poll, notify)."""
POLL_S = 0.02
"""poll: the notice poll while waiting on communication, and the vote's wait slice."""
HB_CHECK_S = 0.5
"""The heartbeat-staleness period (poll: every member's beat; notify: the watcher's period)."""
AGREE_POLL_S = 0.01
"""poll: the agreement's polling period."""
NODE_BEAT_S = NodeWatchConfig.beat_interval_s
"""A launcher's node heartbeat period (launch/node_watch.py)."""
NODE_CHECK_S = NodeWatchConfig.check_interval_s
"""A launcher's period for reading the nodes it watches."""
LAUNCHER_LOOP_S = 0.02
"""odyssey run's --monitor-interval default: the launcher loop's period."""
FENCE_BACKSTOP_S = 1.0
"""The launcher's look at every local rank's fence key when FENCES_COUNT did not move."""
RELAY_WAIT_S = 2.0
"""node: the notice relay's blocking wait slice."""
NOTICE_WAIT_S = 60.0
"""notify: a rank's blocking wait for the notice (and the agreement's for the members)."""

WAKE_STEP = 999_999
"""The step whose decision a rank's watcher aborts at the notice (notify, node): in the
simulation no step is in flight then, so a step no vote uses."""

# Op kinds; store_load_gen.h's `enum Kind` has the same numbers.
ADD, CHECK, CHECK_EACH, CHECK_GET, WAIT, ADD_EACH = range(6)
KIND_NAMES = ("add", "check", "check_each", "check_get", "wait", "add_each")


@dataclass(frozen=True)
class Op:
    """One store request (two for CHECK_GET when the keys exist) on a slot's keys.

    ADD: add(key, delta); CHECK: check(keys); CHECK_EACH: one check per key;
    CHECK_GET: check(keys), then get (one key) or multi_get (several) if all exist;
    WAIT: a blocking wait of `delta` ms on keys nobody writes (it times out); ADD_EACH:
    add(key, delta) per key. A slot without keys (a node's peers in a one-node job)
    makes no request."""

    kind: int
    slot: str
    delta: int = 0


@dataclass(frozen=True)
class Every:
    """Requests made every `period_s` during failure-free training (no skipping: a late
    client catches up, so what it offers does not depend on how fast it is served)."""

    period_s: float
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Plane:
    """One control plane's store traffic, per rank and per node."""

    name: str
    rank_init: tuple[Op, ...] = ()
    """A rank's requests before training starts (its first heartbeat)."""
    rank_every: tuple[Every, ...] = ()
    """A rank's periodic requests besides its steps."""
    step_reads: tuple[Op, ...] = ()
    """The trainer's top-of-step reads, before its vote (per rank)."""
    last_voter_ops: tuple[Op, ...] = ()
    """Made by the step's last voter before it writes the decision (the step-boundary
    reads it answers for every rank: odyssey/step_controls.py)."""
    vote_slice_s: float = WOKEN_POLL_S
    """The decision wait's slice: POLL_S where ranks ask between slices (poll), the
    backstop where the notice's watcher wakes the wait (notify, node)."""
    vote_slice_ops: tuple[Op, ...] = ()
    """Made after each slice of the decision wait that timed out."""
    wake_on_notice: bool = True
    """At the notice each rank's watcher aborts the decision its rank blocks on (two
    compare_sets: the reason, the decision), with its own client."""
    node_every: tuple[Every, ...] = ()
    """A node's launcher's periodic requests; empty: no launcher client is simulated."""
    node_watch_every: tuple[Every, ...] = ()
    """A node's launcher's fence watch thread (its own client): blocking waits."""
    relay: bool = False
    """A node's notice relay: one client blocked in `wait` on the notice, RELAY_WAIT_S slices."""
    learn: str = "wait"
    """How a rank learns of the notice: "poll" (check every POLL_S), "wait" (a blocking
    wait), "relay" (its node's relay tells it locally: no request)."""
    learn_poll_ops: tuple[Op, ...] = ()
    """learn == "poll": made after each check that did not find the notice."""
    agree: str = "decide"
    """"poll": every AGREE_POLL_S a wait slice on the members key, then these re-reads;
    "decide": register once, the registration that completes the set decides, the rest
    block on the members key."""
    agree_poll_ops: tuple[Op, ...] = ()


_HEARTBEAT = Every(HEARTBEAT_S, (Op(ADD, "hb", 1),))
_STEP_READS = (Op(ADD, "inject"), Op(CHECK, "stop_at"), Op(CHECK, "stop"))
"""The trainer's step-boundary reads (odyssey/step_controls.py) as every rank made them
before they came with the commit decision: the inject count, the agreed stop step, the
stop request."""

POLL = Plane(
    "poll",
    rank_init=(Op(ADD, "hb", 1),),
    rank_every=(_HEARTBEAT,
                Every(POLL_S, (Op(CHECK, "notice"), Op(ADD, "exits"))),
                Every(HB_CHECK_S, (Op(CHECK_GET, "hb_all"),))),
    step_reads=(*_STEP_READS, Op(CHECK, "notice")),
    vote_slice_s=POLL_S, wake_on_notice=False,
    vote_slice_ops=(Op(CHECK, "notice"), Op(ADD, "exits")),
    learn="poll", learn_poll_ops=(Op(ADD, "exits"),),
    agree="poll", agree_poll_ops=(Op(ADD, "exits"), Op(ADD, "newcomers")))
NOTIFY = Plane(
    "notify",
    rank_init=(Op(ADD, "hb", 1),),
    rank_every=(_HEARTBEAT,
                Every(HB_CHECK_S, (Op(ADD, "exits"), Op(CHECK_GET, "hb_next")))),
    last_voter_ops=_STEP_READS, learn="wait", agree="decide")
NODE = Plane(
    "node", last_voter_ops=_STEP_READS,
    node_every=(Every(NODE_BEAT_S, (Op(ADD, "node_beat", 1),)),),
    relay=True, learn="relay", agree="decide")
PLANES = {p.name: p for p in (POLL, NOTIFY, NODE)}

LAUNCHER_LOOP = (
    Every(NODE_BEAT_S, (Op(ADD, "node_beat", 1), Op(CHECK, "node_lost"))),
    Every(NODE_CHECK_S, (Op(CHECK, "job_status"), Op(ADD_EACH, "peer_beats"))),
    Every(FENCE_BACKSTOP_S, (Op(CHECK_EACH, "fence_local"),)),
    Every(SLOW_POLL_S, (Op(CHECK, "job_status"), Op(ADD, "spawn"))))
"""What each node's launcher loop asks the store (launch/agent.py): its node beat and
lost check; its node watch (launch/node_watch.py: the job status and the counters of the
next NodeWatchConfig.peers nodes in ring order, multi-node only); its ranks' fence keys
once a second (and when its fence watch saw a request); the job status and the
replacement counter every SLOW_POLL_S. The same for every plane."""
FENCE_WATCH = (Every(FENCE_WATCH_S, (Op(WAIT, "fence_note", int(FENCE_WATCH_S * 1000)),
                                     Op(ADD, "fences"))),)
"""Each launcher's fence watch (launch/fence_watch.py): a blocking wait on the next fence
note, and the counter read after each slice that timed out."""
OLD_LAUNCHER_LOOP = (
    Every(NODE_BEAT_S, (Op(ADD, "node_beat", 1), Op(CHECK, "node_lost"))),
    Every(NODE_CHECK_S, (Op(CHECK, "job_status"), Op(CHECK_EACH, "other_done"),
                         Op(CHECK_EACH, "other_beats"), Op(ADD_EACH, "other_beats"))),
    Every(NODE_CHECK_S, (Op(CHECK, "job_status"), Op(ADD_EACH, "peer_beats"))),
    Every(LAUNCHER_LOOP_S, (Op(ADD, "fences"),)),
    Every(FENCE_BACKSTOP_S, (Op(CHECK_EACH, "fence_local"),)),
    Every(0.1, (Op(CHECK, "job_status"), Op(ADD, "spawn"))))
"""The launcher loop before the fence watch (until 2026-12-02): every other node watched
(three reads each per check), the fence counter read each --monitor-interval, the job
status and replacement counter every 0.1 s."""
OLD_PLANES = {
    "poll": POLL,
    "notify-sliced": replace(NOTIFY, name="notify-sliced", vote_slice_s=POLL_S,
                             wake_on_notice=False, step_reads=_STEP_READS,
                             last_voter_ops=()),
    "node-sliced": replace(NODE, name="node-sliced", vote_slice_s=POLL_S,
                           wake_on_notice=False, step_reads=_STEP_READS, last_voter_ops=())}
"""The planes as they were before the decision wait was woken by the notice (notify until
2026-12-01, node until 2026-12-02): 20 ms decision-wait slices, and every rank making the
step-boundary reads itself. With --launcher-loop
they get the old launcher loop (OLD_LAUNCHER_LOOP); poll is the old design throughout."""


def plane_for(name: str, launcher_loop: bool = False) -> Plane:
    """The plane `name` (PLANES or OLD_PLANES); with `launcher_loop`, each node's
    launcher loop added to it (the old loop for the old planes)."""
    if name not in PLANES and name not in OLD_PLANES:
        raise ValueError(f"plane must be one of {sorted({*PLANES, *OLD_PLANES})}, "
                         f"got {name!r}")
    if name in OLD_PLANES:
        plane = OLD_PLANES[name]
        return replace(plane, node_every=OLD_LAUNCHER_LOOP) if launcher_loop else plane
    plane = PLANES[name]
    return (replace(plane, node_every=LAUNCHER_LOOP, node_watch_every=FENCE_WATCH)
            if launcher_loop else plane)


@dataclass(frozen=True)
class Layout:
    """N simulated ranks on nodes of `ranks_per_node`."""

    ranks: int
    ranks_per_node: int = 8

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.ranks_per_node)

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node,
                          min(self.ranks, (node + 1) * self.ranks_per_node)))


def slot_keys(slot: str, layout: Layout, rank: int = 0, node: int = 0) -> list[str]:
    """The store keys of `slot` for the client of `rank` (a rank) or `node` (a launcher)."""
    n = layout.ranks
    if slot == "hb":
        return [contract.heartbeat_key(rank)]
    if slot == "hb_next":
        return [contract.heartbeat_key((rank + 1) % n)]
    if slot == "hb_all":
        return [contract.heartbeat_key(r) for r in range(n)]
    if slot == "fence_local":
        return [contract.fence_key(r) for r in layout.node_ranks(node)]
    if slot == "node_beat":
        return [contract.node_beat_key(node)]
    if slot == "node_lost":
        return [contract.node_lost_key(node)]
    if slot in ("peer_beats", "other_beats", "other_done"):
        nodes = layout.nodes
        others = ([(node + i) % nodes for i in range(1, nodes)] if slot != "peer_beats" else
                  [(node + i) % nodes for i in range(1, min(nodes, NodeWatchConfig.peers + 1))])
        if slot == "other_done":
            return [contract.node_done_key(x) for x in others]
        return [contract.node_beat_key(x) for x in others]
    if slot == "fence_note":  # the next fence's note: never written in the simulation
        return [contract.fence_note_key(1)]
    fixed = {"notice": contract.notice_key(0), "exits": contract.EXITS_COUNT,
             "inject": contract.INJECT_COUNT, "stop": contract.STOP_REQUEST,
             "stop_at": contract.STOP_AT,
             "newcomers": contract.NEWCOMERS_COUNT, "fences": contract.FENCES_COUNT,
             "job_status": contract.JOB_STATUS, "spawn": contract.SPAWN_COUNT}
    if slot not in fixed:
        raise ValueError(f"unknown key slot {slot!r}")
    return [fixed[slot]]


_STEP, _RANK = 987_654_321, 987_654_322


def _template(key: str) -> str:
    return key.replace(str(_STEP), "{step}").replace(str(_RANK), "{rank}")


@dataclass(frozen=True)
class Templates:
    """The per-step (generation 0) and agreement (generation 1) keys, "{step}"/"{rank}"
    left open: store_load_gen.h fills them in the same way `key` does."""

    vote: str = _template(contract.vote_key(0, _STEP, _RANK))
    votes: str = _template(contract.vote_count_key(0, _STEP))
    decision: str = _template(contract.decision_key(0, _STEP))
    abort_reason: str = _template(contract.abort_reason_key(0, _STEP))
    join: str = _template(contract.join_key(1, _RANK))
    joined: str = contract.joined_count_key(1)
    members: str = contract.members_key(1)
    notice: str = contract.notice_key(0)

    @staticmethod
    def key(template: str, step: int = 0, rank: int = 0) -> str:
        return template.replace("{step}", str(step)).replace("{rank}", str(rank))


def op_requests(op: Op, layout: Layout, node: int = 0) -> int:
    """Requests `op` makes when every key it reads exists (as in steady training)."""
    if op.kind in (CHECK_EACH, ADD_EACH):
        return len(slot_keys(op.slot, layout, node=node))
    if op.kind == ADD and not slot_keys(op.slot, layout, node=node):
        return 0
    if op.kind == WAIT:
        return 1
    return 2 if op.kind == CHECK_GET else 1


def offered_per_s(plane: Plane, layout: Layout, step_s: float) -> tuple[float, float]:
    """(per rank, per node) store requests/s the plane asks for in steady training.

    A step: the reads, the vote's set and add, the last voter's reads and compare_set
    (1/N per rank), one wait for the decision and its get; decision-wait slices that time out
    (poll: two more requests each) are not counted. A relay: one wait slice per
    RELAY_WAIT_S."""
    def rate(every: tuple[Every, ...]) -> float:
        return sum(sum(op_requests(o, layout) for o in e.ops) / e.period_s for e in every)

    step = (len(plane.step_reads) + 4 + (1 + len(plane.last_voter_ops)) / layout.ranks
            ) / step_s
    return (rate(plane.rank_every) + step,
            rate(plane.node_every) + rate(plane.node_watch_every)
            + (1 / RELAY_WAIT_S if plane.relay else 0.0))


def phase_s(client: int, period_s: float) -> float:
    """Offset of a client's periodic requests within their period: spread evenly (golden
    ratio), as processes that started at different moments are; steps stay aligned (every
    rank finishes a step together). Client ids: ranks 0..N-1, node i's launcher N + i."""
    return (client * 0.6180339887498949) % 1.0 * period_s


def scheduled_requests(plane: Plane, layout: Layout, step_s: float, seconds: float
                       ) -> tuple[int, int]:
    """(ranks', launchers' and relays') requests the schedule asks for in `seconds` of
    steady training: what a generator that keeps up makes (the achieved/offered check).

    Per periodic task of a client with offset p: ceil((seconds - p) / period) requests
    times its ops; per rank the init ops and ceil(seconds / step_s) - 1 steps (the first
    at step_s) of offered_per_s's requests; per relay one wait slice per RELAY_WAIT_S.
    Client ids: ranks 0..N-1, node i's launcher N + i, its fence watch N + nodes + i."""
    eps = 1e-9

    def count(every: tuple[Every, ...], client: int, node: int = 0) -> int:
        return sum(math.ceil((seconds - phase_s(client, e.period_s)) / e.period_s - eps)
                   * sum(op_requests(o, layout, node) for o in e.ops) for e in every)

    n = layout.ranks
    steps = max(0, math.ceil(seconds / step_s - eps) - 1)
    ranks = (n * (len(plane.rank_init) + steps * (len(plane.step_reads) + 4))
             + steps * (1 + len(plane.last_voter_ops))
             + sum(count(plane.rank_every, r) for r in range(n)))
    nodes = sum(count(plane.node_every, n + i, i)
                + count(plane.node_watch_every, n + layout.nodes + i, i)
                for i in range(layout.nodes))
    if plane.relay:
        nodes += layout.nodes * math.floor(seconds / RELAY_WAIT_S + eps)
    return ranks, nodes


class Client(Protocol):
    """What the procedures below need of a simulated client (store_load_py.Caller)."""

    def do(self, op: Op) -> None: ...
    def add(self, key: str, delta: int) -> int: ...
    def set(self, key: str, value: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def check(self, keys: list[str]) -> bool: ...
    def multi_get(self, keys: list[str]) -> list[bytes]: ...
    def compare_set(self, key: str, expected: str, desired: str) -> bytes: ...
    def wait(self, keys: list[str], timeout_s: float) -> bool:
        """A blocking wait; False when it timed out."""


def vote(c: Client, plane: Plane, t: Templates, step: int, rank: int, n: int,
         t_notice: float) -> bool:
    """One step's reads and vote; False when the notice aborted it (store_load_gen.h:
    `vote`)."""
    for op in plane.step_reads:
        c.do(op)
    c.set(t.key(t.vote, step, rank), "{}")
    decision = t.key(t.decision, step)
    if c.add(t.key(t.votes, step), 1) == n:
        for op in plane.last_voter_ops:
            c.do(op)
        c.compare_set(decision, "", "commit")
    while not c.wait([decision], plane.vote_slice_s):
        for op in plane.vote_slice_ops:
            c.do(op)
        if time.monotonic() > t_notice:  # the step is aborted by the notice
            return False
    c.get(decision)
    return True


def learn_notice(c: Client, plane: Plane, t: Templates, relayed) -> None:
    """Block until this rank knows of the notice, then (wake_on_notice) make its
    watcher's abort of the decision (store_load_gen.h: `learn_notice`). `relayed`: the
    node relay's local event (plane.learn == "relay")."""
    if plane.learn == "poll":
        while not c.check([t.notice]):
            for op in plane.learn_poll_ops:
                c.do(op)
            time.sleep(POLL_S)
    elif plane.learn == "relay":
        relayed.wait(NOTICE_WAIT_S)  # the relayed notice file: a local look, no request
    else:
        c.wait([t.notice], NOTICE_WAIT_S)
    if plane.wake_on_notice:  # the watcher aborts the decision its rank would block on
        c.compare_set(t.key(t.abort_reason, WAKE_STEP), "", "failure")
        c.compare_set(t.key(t.decision, WAKE_STEP), "", "abort")


def agree(c: Client, plane: Plane, t: Templates, rank: int, n: int) -> None:
    """Register in generation 1 and end with its membership (store_load_gen.h: `agree`)."""
    c.set(t.key(t.join, rank=rank), "{}")
    count = c.add(t.joined, 1)
    joins = [t.key(t.join, rank=r) for r in range(n)]
    polling = plane.agree == "poll"
    while True:
        if polling:
            if c.wait([t.members], AGREE_POLL_S):
                return
            for op in plane.agree_poll_ops:
                c.do(op)
            count = c.add(t.joined, 0)
        if count >= n and c.check(joins):
            c.multi_get(joins)
            c.compare_set(t.members, "", "decided")
            return
        if not polling:
            c.wait([t.members], NOTICE_WAIT_S)
            return

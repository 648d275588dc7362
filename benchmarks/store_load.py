"""Control-plane load: N simulated ranks, each with its own TCPStore client, one server.

Each simulated rank replays the runtime's own key traffic (odyssey/monitor.py,
membership.py, commit.py) for `--seconds`, then a failure notice is published and every
rank runs the agreement. Two control planes (monitor.control_plane):

- poll (the old design): heartbeat `add` every 0.2 s; while waiting on communication
  (here: all the time, an upper bound) `check(notice)` + `add(exits, 0)` every 20 ms;
  every 0.5 s `check` + `multi_get` of every member's heartbeat; per step a vote (`set`,
  `add`, blocking `wait` for the decision, `get`) and a notice check; agreement polls
  every 10 ms (exit count, newcomers, joined count, `check` of every join key).
- notify (the default): heartbeat as before; one watcher per rank blocks in `wait` on the
  notice key and, each 0.5 s period, reads the exit count and one neighbour's heartbeat;
  the vote as before; agreement: register, and the registration that completes the set
  decides (compare-and-set), the others block in `wait` on the members key.
- node: per-rank liveness stays on the node. Per rank only the step's traffic (the vote
  and the trainer's per-step reads); per node (`--ranks-per-node` ranks) one launcher
  heartbeat `add` every 0.25 s and one notice relay blocked in `wait` (2 s slices); the
  launcher's reads of its workers' heartbeat files and the workers' watch of the relayed
  notice file are local (no request). After the notice each node's relay wakes and
  tells its ranks locally; agreement as notify.

Every plane's step makes the trainer's per-step reads (the inject counter, the stop
request; poll also asks for the notice) and the vote (`set`, `add`, the last voter's
`compare_set`, blocking `wait` for the decision in 20 ms slices, `get`). `--launcher-loop`
adds, under every plane, what each node's launcher loop asks the store every 20 ms
(`--monitor-interval`'s default: a fence-key `check` per local rank, the job status, the
spawn counter; its node beat and lost check every 0.25 s): the same for every plane, and
not counted by default.

It prints, per N: store requests/s achieved, the offered rate, p50/p99 latency of every
request, and after the notice how long until every rank saw it and until every rank had
the agreed membership. Loopback only; bounded: N <= 1024 threads spread over `--procs`
processes, `--seconds` of steady traffic per point.

    python benchmarks/store_load.py                       # N = 8, 64, 256, 1024, all planes
    python benchmarks/store_load.py --ranks 8,64 --seconds 2 --planes notify,node
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from benchmarks.common import out_dir  # noqa: E402
from odyssey import contract  # noqa: E402

HEARTBEAT_S = 0.2
POLL_S = 0.02
HB_CHECK_S = 0.5
AGREE_POLL_S = 0.01
NODE_BEAT_S = 0.25
LAUNCHER_LOOP_S = 0.02
"""odyssey run's --monitor-interval default: the launcher loop's period."""
SLOW_POLL_S = 0.1
"""The launcher's period for the job status and the replacement counter."""
FENCE_BACKSTOP_S = 1.0
"""The launcher's look at every local rank's fence key when FENCES_COUNT did not move."""
RELAY_WAIT_S = 2.0
PLANES = ("poll", "notify", "node")


class _Calls:
    """A client with its latency samples (a simulated rank's or launcher's)."""

    def __init__(self, port: int):
        self.store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                   timeout=timedelta(seconds=120))
        self.lat: list[float] = []
        self.waits = 0

    def _call(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.lat.append(time.perf_counter() - t)

    def _wait(self, keys: list[str], timeout_s: float) -> None:
        """A blocking wait: counted as a request, not as a latency sample."""
        self.waits += 1
        self.store.wait(keys, timedelta(seconds=timeout_s))

    @property
    def requests(self) -> int:
        return len(self.lat) + self.waits


class _Launcher(_Calls):
    """One simulated node's launcher: its node heartbeat (every plane, with
    --launcher-loop: and the loop's reads), and under node the notice relay."""

    def __init__(self, node: int, ranks: list[int], port: int, plane: str, loop: bool):
        super().__init__(port)
        self.node, self.ranks, self.plane, self.loop = node, ranks, plane, loop
        self.relay = _Calls(port) if plane == "node" else None
        self.noticed = threading.Event()  # node: the relayed notice file, seen locally
        self.t_start = self.t_notice = 0.0
        self.steady_requests = 0
        self.relay_steady = 0  # relay waits that timed out before the notice
        self.relayed_at: float | None = None

    def run(self) -> None:
        s, now = self.store, time.monotonic
        fences = [contract.fence_key(r) for r in self.ranks]
        beat = contract.node_beat_key(self.node)
        while now() < self.t_start:
            time.sleep(0.005)
        next_beat = next_loop = next_fence_keys = next_slow = now()
        if not self.loop:
            next_loop = float("inf")
        while now() < self.t_notice:
            t = now()
            if self.plane == "node" or self.loop:  # node: one beat per node replaces ranks'
                if t >= next_beat:
                    self._call(s.add, beat, 1)
                    if self.loop:
                        self._call(s.check, [contract.node_lost_key(self.node)])
                    next_beat += NODE_BEAT_S
            if self.loop and t >= next_loop:
                # the fence counter each period; the ranks' fence keys once a second
                self._call(s.add, contract.FENCES_COUNT, 0)
                if t >= next_fence_keys:
                    for key in fences:
                        self._call(s.check, [key])
                    next_fence_keys += FENCE_BACKSTOP_S
                if t >= next_slow:  # job status and replacement requests: 10/s
                    self._call(s.check, [contract.JOB_STATUS])
                    self._call(s.add, contract.SPAWN_COUNT, 0)
                    next_slow += SLOW_POLL_S
                next_loop += LAUNCHER_LOOP_S
            time.sleep(max(0.0, min(next_beat, next_loop) - now()))
        self.steady_requests = self.requests

    def run_relay(self) -> None:
        """node: block on the notice key (2 s slices), then tell the node's ranks."""
        r, key = self.relay, contract.notice_key(0)
        while time.monotonic() < self.t_start:
            time.sleep(0.005)
        while True:
            steady = time.monotonic() < self.t_notice
            try:
                r._wait([key], RELAY_WAIT_S)
                break
            except dist.DistStoreError:
                self.relay_steady += steady
                if time.monotonic() > self.t_notice + 60:
                    return
        r._call(r.store.get, key)
        self.relayed_at = time.time()
        self.noticed.set()


class _Rank(_Calls):
    """One simulated rank: its own client, its own latency samples."""

    def __init__(self, rank: int, n: int, port: int, plane: str, step_s: float,
                 t_start: float, t_notice: float, t_end: float,
                 launcher: _Launcher | None = None):
        super().__init__(port)
        self.rank, self.n, self.plane, self.step_s = rank, n, plane, step_s
        self.t_start, self.t_notice, self.t_end = t_start, t_notice, t_end
        self.launcher = launcher
        self.steady_requests = 0
        self.saw_notice: float | None = None
        self.agreed: float | None = None
        self.published: float | None = None

    def run(self) -> None:
        s, me = self.store, self.rank
        hb = contract.heartbeat_key(me)
        nxt = contract.heartbeat_key((me + 1) % self.n)
        all_hb = [contract.heartbeat_key(r) for r in range(self.n)]
        notice = contract.notice_key(0)
        if self.plane != "node":
            self._call(s.add, hb, 1)
        now = time.monotonic
        while now() < self.t_start:
            time.sleep(0.005)
        next_hb = next_poll = next_check = now()
        if self.plane == "node":  # beats and watching are node-local: no request
            next_hb = next_poll = next_check = float("inf")
        next_step, step = self.t_start + self.step_s, 0
        while now() < self.t_notice:
            t = now()
            if t >= next_hb:
                self._call(s.add, hb, 1)
                next_hb += HEARTBEAT_S
            if t >= next_step:
                self._vote(step)
                step += 1
                next_step += self.step_s
            if self.plane == "poll":
                if t >= next_poll:
                    self._call(s.check, [notice])
                    self._call(s.add, contract.EXITS_COUNT, 0)
                    next_poll += POLL_S
                if t >= next_check:
                    if self._call(s.check, all_hb):
                        self._call(s.multi_get, all_hb)
                    next_check += HB_CHECK_S
                due = min(next_hb, next_step, next_poll, next_check)
            elif self.plane == "node":
                due = next_step
            else:
                if t >= next_check:  # the watcher's period: its wait timed out
                    self._call(s.add, contract.EXITS_COUNT, 0)
                    if self._call(s.check, [nxt]):
                        self._call(s.get, nxt)
                    next_check += HB_CHECK_S
                due = min(next_hb, next_step, next_check)
            time.sleep(max(0.0, due - now()))
        self.steady_requests = len(self.lat) + self.waits
        self._recover(notice)

    def _vote(self, step: int) -> None:
        s = self.store
        # the trainer's top-of-step reads: injected faults, a stop request; the notice is
        # a store read only under poll (a local flag under notify and node)
        self._call(s.add, contract.INJECT_COUNT, 0)
        self._call(s.check, [contract.STOP_REQUEST])
        if self.plane == "poll":
            self._call(s.check, [contract.notice_key(0)])
        self._call(s.set, contract.vote_key(0, step, self.rank), "{}")
        if self._call(s.add, contract.vote_count_key(0, step), 1) == self.n:
            self._call(s.compare_set, contract.decision_key(0, step), "", "commit")
        key = contract.decision_key(0, step)
        while True:
            try:
                self._wait([key], POLL_S)
                break
            except dist.DistStoreError:
                if self.plane == "poll":
                    self._call(s.check, [contract.notice_key(0)])
                    self._call(s.add, contract.EXITS_COUNT, 0)
                if time.monotonic() > self.t_notice:  # the step is aborted by the notice
                    return
        self._call(s.get, key)

    def _recover(self, notice: str) -> None:
        s, n = self.store, self.n
        if self.rank == 0:
            self._call(s.compare_set, notice, "", "failure")
            self.published = time.time()
        gen = 1
        if self.plane == "poll":
            while True:
                if self._call(s.check, [notice]):
                    break
                self._call(s.add, contract.EXITS_COUNT, 0)
                time.sleep(POLL_S)
        elif self.plane == "node":
            self.launcher.noticed.wait(60)  # the relayed notice file (a local stat)
        else:
            self._wait([notice], 60)
        self.saw_notice = time.time()
        self._call(s.set, contract.join_key(gen, self.rank), "{}")
        count = self._call(s.add, contract.joined_count_key(gen), 1)
        members = contract.members_key(gen)
        joins = [contract.join_key(gen, r) for r in range(n)]
        first = self.plane != "poll"
        while True:
            if not first:
                try:
                    self._wait([members], AGREE_POLL_S)
                    break
                except dist.DistStoreError:
                    pass
                self._call(s.add, contract.EXITS_COUNT, 0)
                self._call(s.add, contract.NEWCOMERS_COUNT, 0)
                count = self._call(s.add, contract.joined_count_key(gen), 0)
            first = False
            if count >= n and self._call(s.check, joins):
                self._call(s.multi_get, joins)
                self._call(s.compare_set, members, "", "decided")
                break
            if self.plane != "poll":
                self._wait([members], 60)
                break
        self.agreed = time.time()


def _proc(nodes: list[int], n: int, rpn: int, port: int, plane: str, step_s: float,
          loop: bool, start, go, seconds: float, out) -> None:
    sims, launchers = [], []
    for node in nodes:
        ranks = list(range(node * rpn, min(n, (node + 1) * rpn)))
        launcher = (_Launcher(node, ranks, port, plane, loop) if plane == "node" or loop
                    else None)
        if launcher is not None:
            launchers.append(launcher)
        sims += [_Rank(r, n, port, plane, step_s, 0, 0, 0, launcher) for r in ranks]
    out.put("ready")
    go.wait()
    # wall times cross processes: convert the shared plan into this process's monotonic
    off = time.monotonic() - time.time()
    t_start, t_notice = start.value + off, start.value + seconds + off
    for x in [*sims, *launchers]:
        x.t_start, x.t_notice = t_start, t_notice
    for x in sims:
        x.t_end = t_notice + 60
    runs = [x.run for x in [*sims, *launchers]] + [x.run_relay for x in launchers
                                                     if x.relay is not None]
    threads = [threading.Thread(target=f, daemon=True) for f in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    clients = [*sims, *launchers, *(x.relay for x in launchers if x.relay is not None)]
    out.put({"lat": [v for x in clients for v in x.lat],
             "steady": sum(x.steady_requests for x in [*sims, *launchers])
             + sum(x.relay_steady for x in launchers),
             "launcher_steady": sum(x.steady_requests + x.relay_steady for x in launchers),
             "total": sum(x.requests for x in clients),
             "saw": [x.saw_notice for x in sims], "agreed": [x.agreed for x in sims],
             "relayed": [x.relayed_at for x in launchers if x.relay is not None],
             "published": next((x.published for x in sims if x.rank == 0), None)})


def measure(n: int, plane: str, seconds: float, procs: int, step_s: float,
            ranks_per_node: int = 8, launcher_loop: bool = False) -> dict:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    nnodes = -(-n // ranks_per_node)
    k = min(procs, nnodes)
    start, go = ctx.Value("d", 0.0), ctx.Event()
    ps = [ctx.Process(target=_proc, args=(list(range(i, nnodes, k)), n, ranks_per_node,
                                          server.port, plane, step_s, launcher_loop, start,
                                          go, seconds, q)) for i in range(k)]
    for p in ps:
        p.start()
    for _ in ps:  # every client connected
        q.get(timeout=300)
    load = os.getloadavg()[0]
    start.value = t0 = time.time() + 0.5
    go.set()
    parts = [q.get(timeout=seconds + 300) for _ in ps]
    for p in ps:
        p.join(10)
    t_notice = t0 + seconds
    lat = sorted(v for p in parts for v in p["lat"])
    saw = [t for p in parts for t in p["saw"] if t]
    agreed = [t for p in parts for t in p["agreed"] if t]
    steady = sum(p["steady"] for p in parts)
    launcher = sum(p["launcher_steady"] for p in parts)
    relayed = [t for p in parts for t in p["relayed"] if t]
    published = next((p["published"] for p in parts if p["published"]), None)
    del server
    return {"ranks": n, "plane": plane, "ranks_per_node": ranks_per_node, "nodes": nnodes,
            "launcher_loop": launcher_loop, "loadavg_1m": load,
            "requests_per_s": steady / seconds,
            "per_rank_per_s": steady / seconds / n,
            "per_node_per_s": steady / seconds / nnodes,
            "launcher_requests_per_s": launcher / seconds,
            "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None,
            "notice_to_all_seen_ms": 1e3 * (max(saw) - t_notice) if len(saw) == n else None,
            "notice_to_all_agreed_ms": (1e3 * (max(agreed) - t_notice)
                                        if len(agreed) == n else None),
            "agree_requests": sum(p["total"] - p["steady"] for p in parts),
            "published_after_ms": 1e3 * (published - t_notice) if published else None,
            "notice_to_all_relays_ms": (1e3 * (max(relayed) - t_notice)
                                        if relayed and len(relayed) == nnodes else None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64,256,1024")
    ap.add_argument("--planes", default=",".join(PLANES))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=4, help="generator processes")
    ap.add_argument("--step-s", type=float, default=0.5, help="simulated step time")
    ap.add_argument("--ranks-per-node", type=int, default=8,
                    help="ranks per simulated node (node plane: one launcher each)")
    ap.add_argument("--launcher-loop", action="store_true",
                    help="also count each launcher loop's own store reads (every plane)")
    ap.add_argument("--out", default=str(out_dir() / "store_load.json"))
    args = ap.parse_args(argv)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every point: a run cut short keeps what it measured
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                   "mode": "simulated ranks (threads), loopback",
                                   "step_s": args.step_s, "ranks_per_node": args.ranks_per_node,
                                   "launcher_loop": args.launcher_loop, "rows": rows},
                                  indent=1))

    for n in [int(x) for x in args.ranks.split(",")]:
        if not 1 <= n <= 1024:
            raise SystemExit("--ranks: 1..1024")
        for plane in args.planes.split(","):
            if plane not in PLANES:
                raise SystemExit(f"--planes: one of {PLANES}")
            r = measure(n, plane, args.seconds, args.procs, args.step_s,
                        args.ranks_per_node, args.launcher_loop)
            rows.append(r)
            save()
            print(f"N={n:5d} {plane:>6}: {r['requests_per_s']:9.0f} req/s "
                  f"({r['per_rank_per_s']:6.1f}/rank, {r['per_node_per_s']:6.1f}/node of "
                  f"{args.ranks_per_node}), latency p50 {r['p50_ms']:.3f} ms "
                  f"p99 {r['p99_ms']:.3f} ms; notice->all seen {r['notice_to_all_seen_ms']} ms, "
                  f"->all agreed {r['notice_to_all_agreed_ms']} ms "
                  f"({r['agree_requests']} requests); load {r['loadavg_1m']:.2f}", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python load generator: simulated clients as threads, spread over processes.

The reference at small N (its store calls are the runtime's own Python client calls);
beyond ~256 ranks on a 2-core machine its threads starve on the GIL and it no longer
offers the load (store_load_gen.cpp does). Every client replays its `Plane`
(store_load_traffic.py) for `seconds`; then rank 0 publishes the notice and every rank
learns it and agrees. `run` returns the raw parts store_load.py summarises.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from benchmarks import store_load_traffic as tr


class Caller:
    """One client (a rank's, a launcher's or a relay's): its own TCPStore connection and
    its latency samples, steady training apart from the recovery."""

    def __init__(self, port: int, layout: tr.Layout, rank: int = 0, node: int = 0):
        self.store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                   timeout=timedelta(seconds=120))
        self.layout, self.rank, self.node = layout, rank, node
        self.steady = True
        self.lat: list[float] = []
        self.rec_lat: list[float] = []
        self.waits = self.steady_requests = self.steady_waits = 0
        self._slots: dict[str, list[str]] = {}

    @property
    def requests(self) -> int:
        return len(self.lat) + len(self.rec_lat) + self.waits

    def end_steady(self) -> None:
        self.steady_requests, self.steady_waits, self.steady = self.requests, self.waits, False

    def _call(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            (self.lat if self.steady else self.rec_lat).append(time.perf_counter() - t)

    def keys(self, slot: str) -> list[str]:
        if slot not in self._slots:
            self._slots[slot] = tr.slot_keys(slot, self.layout, self.rank, self.node)
        return self._slots[slot]

    def do(self, op: tr.Op) -> None:
        keys = self.keys(op.slot)
        if not keys:
            return
        if op.kind == tr.ADD:
            self.add(keys[0], op.delta)
        elif op.kind == tr.ADD_EACH:
            for key in keys:
                self.add(key, op.delta)
        elif op.kind == tr.CHECK:
            self.check(keys)
        elif op.kind == tr.CHECK_EACH:
            for key in keys:
                self.check([key])
        elif op.kind == tr.WAIT:
            self.wait(keys, op.delta / 1000)
        elif op.kind == tr.CHECK_GET and self.check(keys):
            if len(keys) == 1:
                self.get(keys[0])
            else:
                self.multi_get(keys)

    def add(self, key: str, delta: int) -> int:
        return self._call(self.store.add, key, delta)

    def set(self, key: str, value: str) -> None:
        self._call(self.store.set, key, value)

    def get(self, key: str) -> bytes:
        return self._call(self.store.get, key)

    def check(self, keys: list[str]) -> bool:
        return self._call(self.store.check, keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._call(self.store.multi_get, keys)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self._call(self.store.compare_set, key, expected, desired)

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        """A blocking wait: counted as a request, not as a latency sample."""
        self.waits += 1
        try:
            self.store.wait(keys, timedelta(seconds=timeout_s))
            return True
        except dist.DistStoreError:
            return False

    def periodic(self, every: tuple[tr.Every, ...], client: int, t_start: float,
                 t_until: float, step_s: float = 0.0, on_step=None) -> None:
        """Run `every` (and, with `on_step`, a step each `step_s`) until `t_until`."""
        now = time.monotonic
        due = [t_start + tr.phase_s(client, e.period_s) for e in every]
        next_step = t_start + step_s if on_step else float("inf")
        step = 0
        while now() < t_until:
            t = now()
            for i, e in enumerate(every):
                if t >= due[i]:
                    for op in e.ops:
                        self.do(op)
                    due[i] += e.period_s
            if t >= next_step:
                on_step(step)
                step += 1
                next_step += step_s
            time.sleep(max(0.0, min([*due, next_step]) - now()))


def _rank(c: Caller, plane: tr.Plane, t: tr.Templates, step_s: float, t_start: float,
          t_notice: float, relayed: threading.Event | None, out: dict) -> None:
    n = c.layout.ranks
    for op in plane.rank_init:
        c.do(op)
    while time.monotonic() < t_start:
        time.sleep(0.005)
    c.periodic(plane.rank_every, c.rank, t_start, t_notice, step_s,
               lambda step: tr.vote(c, plane, t, step, c.rank, n, t_notice))
    c.end_steady()
    if c.rank == 0:
        c.compare_set(t.notice, "", "failure")
        out["published"] = time.monotonic()
    tr.learn_notice(c, plane, t, relayed)
    out["saw"][c.rank] = time.monotonic()
    tr.agree(c, plane, t, c.rank, n)
    out["agreed"][c.rank] = time.monotonic()


def _launcher(c: Caller, every: tuple[tr.Every, ...], client: int, t_start: float,
              t_notice: float) -> None:
    """A node's launcher loop, or its fence watch thread (each its own client)."""
    while time.monotonic() < t_start:
        time.sleep(0.005)
    c.periodic(every, client, t_start, t_notice)
    c.end_steady()


def _relay(c: Caller, t: tr.Templates, t_start: float, t_notice: float,
           relayed: threading.Event, out: dict) -> None:
    """node: block on the notice key in RELAY_WAIT_S slices, then tell the node's ranks."""
    while time.monotonic() < t_start:
        time.sleep(0.005)
    steady_slices = 0
    while not c.wait([t.notice], tr.RELAY_WAIT_S):
        steady_slices += time.monotonic() < t_notice
        if time.monotonic() > t_notice + tr.NOTICE_WAIT_S:
            return
    c.steady_requests = steady_slices  # the wait that returned is the recovery's
    c.steady = False
    c.get(t.notice)
    out["relayed"][c.node] = time.monotonic()
    relayed.set()


def _proc(nodes: list[int], layout: tr.Layout, port: int, plane: tr.Plane, step_s: float,
          start, go, seconds: float, q) -> None:
    t = tr.Templates()
    out = {"saw": {}, "agreed": {}, "relayed": {}, "published": None}
    runs, ranks, launchers, relays = [], [], [], []
    t0 = time.monotonic()
    for node in nodes:
        relayed = threading.Event() if plane.relay else None
        if plane.node_every:
            launchers.append((Caller(port, layout, node=node), plane.node_every,
                              layout.ranks + node))
        if plane.node_watch_every:
            launchers.append((Caller(port, layout, node=node), plane.node_watch_every,
                              layout.ranks + layout.nodes + node))
        if plane.relay:
            relays.append((Caller(port, layout, node=node), relayed))
        ranks += [(Caller(port, layout, rank=r, node=node), relayed)
                  for r in layout.node_ranks(node)]
    q.put({"connect_s": time.monotonic() - t0})
    go.wait()
    t_start, t_notice = start.value, start.value + seconds
    runs += [lambda c=c, e=e: _rank(c, plane, t, step_s, t_start, t_notice, e, out)
             for c, e in ranks]
    runs += [lambda c=c, e=e, i=i: _launcher(c, e, i, t_start, t_notice)
             for c, e, i in launchers]
    runs += [lambda c=c, e=e: _relay(c, t, t_start, t_notice, e, out) for c, e in relays]
    threads = [threading.Thread(target=f, daemon=True) for f in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 120)
    rank_c = [c for c, _ in ranks]
    node_c = [c for c, _, _ in launchers] + [c for c, _ in relays]
    every = rank_c + node_c
    q.put({"lat": [v for c in every for v in c.lat],
           "rec_lat": [v for c in every for v in c.rec_lat],
           "rank_steady": sum(c.steady_requests for c in rank_c),
           "rank_steady_waits": sum(c.steady_waits for c in rank_c),
           "node_steady": sum(c.steady_requests for c in node_c),
           "total": sum(c.requests for c in every), **out})


def run(layout: tr.Layout, plane: tr.Plane, port: int, seconds: float, step_s: float,
        procs: int = 4, env: dict | None = None) -> dict:
    """One point: connect, replay `seconds` of training, the notice and the agreement.
    `env`: the generator processes' environment (store_load_cpp.resolver_env).

    Returns the raw parts (times are time.monotonic(); latencies in seconds)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    k = min(procs, layout.nodes)
    start, go = ctx.Value("d", 0.0), ctx.Event()
    t0 = time.monotonic()
    ps = [ctx.Process(target=_proc, args=(list(range(i, layout.nodes, k)), layout, port,
                                          plane, step_s, start, go, seconds, q))
          for i in range(k)]
    saved = dict(os.environ)
    os.environ.update(env or {})  # spawned children start with the parent's environment
    try:
        for p in ps:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    connect = [q.get(timeout=300)["connect_s"] for _ in ps]
    connect_s = time.monotonic() - t0
    start.value = t_start = time.monotonic() + 0.5
    go.set()
    parts = [q.get(timeout=seconds + 300) for _ in ps]
    for p in ps:
        p.join(10)
    merged = {"saw": {}, "agreed": {}, "relayed": {}}
    for part in parts:
        for name in merged:
            merged[name].update(part[name])
    return {"t_start": t_start, "t_notice": t_start + seconds,
            "connect_s": connect_s, "connect_per_proc_s": max(connect),
            "lat": [v for p in parts for v in p["lat"]],
            "rec_lat": [v for p in parts for v in p["rec_lat"]],
            "rank_steady": sum(p["rank_steady"] for p in parts),
            "rank_steady_waits": sum(p["rank_steady_waits"] for p in parts),
            "node_steady": sum(p["node_steady"] for p in parts),
            "total": sum(p["total"] for p in parts),
            "saw": list(merged["saw"].values()), "agreed": list(merged["agreed"].values()),
            "relayed": list(merged["relayed"].values()),
            "published": next((p["published"] for p in parts if p["published"]), None)}

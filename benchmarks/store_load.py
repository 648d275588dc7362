"""Control-plane load: N simulated ranks, each with its own TCPStore client, one server.

Each simulated rank replays the runtime's own key traffic (odyssey/monitor.py,
membership.py, commit.py) for `--seconds`, then a failure notice is published and every
rank runs the agreement. Three control planes (monitor.control_plane):

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
`compare_set`, blocking `wait` for the decision, `get`); poll waits in 20 ms slices,
notify and node in 1 s backstop slices, since each rank's notice watcher aborts the
decision at the notice (two `compare_set`s per rank, counted in the recovery). Steps are
aligned across ranks (they finish a step together), periodic requests spread over their
period. `--launcher-loop` adds what each node's launcher asks the store (its node beat
and lost check every 0.25 s, its ranks' fence keys once a second, the job status and
spawn counter every 0.5 s; its fence watch's blocking wait in 2 s slices and a counter
read after each): not counted by default. `notify-sliced` and `node-sliced` are those
planes as they were before the woken decision wait (20 ms slices), with the launcher
loop as it was (the fence counter read every 20 ms, job status and spawns every 0.1 s).
The traffic is data in store_load_traffic.py, which both generators replay:

- `--engine cpp` (default when it builds): store_load_gen.cpp, one std::thread per
  client, each its own c10d::TCPStore connection, in one worker process; offers 1024+
  ranks on 2 cores. `--engine python`: threads over `--procs` processes (the reference at
  small N; starves on the GIL beyond ~256 ranks). `auto` falls back to python, saying so.
- The server is `odyssey store` in its own process. Both sides preload
  store_load_numeric_names.c (`--no-shim`: not): c10d reverse-resolves every connection's
  peer, and a dropped DNS query stalls that connect and the server's loop 5 s.

It prints, per point: store requests/s achieved against what the schedule offered (a
point that got < 95% says the generator fell short), p50/p99 latency of every steady
request, after the notice how long until every rank saw it and had the agreed
membership, connect time, and the cores the server, the generator and the whole machine
used. `--knee PLANE` then sweeps PLANE over `--knee-ranks` until achieved/offered or p99
breaks, and says whether each plane at the largest N offers less than the knee.

    python benchmarks/store_load.py            # N = 8, 64, 256, 1024, all planes; the knee
    python benchmarks/store_load.py --ranks 8,64 --seconds 2 --planes notify,node --knee ""
    python benchmarks/store_load.py --engine python --ranks 8,64   # the reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# c10d logs every timed-out short wait (the vote's and agreement's slices): quiet it
# before torch loads, or the generators spend their CPU writing warnings
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from benchmarks import store_load_cpp, store_load_py  # noqa: E402
from benchmarks import store_load_traffic as tr  # noqa: E402
from benchmarks.common import out_dir  # noqa: E402
from benchmarks.store_load_server import CpuSampler, store_server  # noqa: E402

PLANES = tuple(tr.PLANES) + tuple(k for k in tr.OLD_PLANES if k not in tr.PLANES)
ENGINES = ("auto", "cpp", "python")
MAX_RANKS = {"cpp": 4096, "python": 1024}
"""Bounds on simulated ranks per point (threads; the Python engine starves beyond ~256)."""
ACHIEVED_MIN = 0.95
"""Below this fraction of the offered requests a point says the generator fell short."""
KNEE_RANKS = "64,128,160,192,224,256,384,512,1024"
KNEE_P99_FACTOR = 4.0
"""The knee sweep stops where p99 exceeds this multiple of its first point's (and 1 ms)."""


def engine_for(name: str) -> str:
    """"auto": cpp when the extension builds here, else python (with the reason printed)."""
    if name not in ENGINES:
        raise SystemExit(f"--engine: one of {ENGINES}")
    if name == "python":
        return name
    try:
        store_load_cpp.load()
        return "cpp"
    except RuntimeError as err:
        if name == "cpp":
            raise SystemExit(f"--engine cpp: the compiled generator is unavailable ({err})"
                             ) from err
        print(f"store_load: compiled generator unavailable ({err}); using the Python "
              "generator (it cannot offer the load beyond ~256 ranks on 2 cores)", flush=True)
        return "python"


def _pct(xs: list[float], q: float) -> float | None:
    return 1e3 * xs[min(len(xs) - 1, int(len(xs) * q))] if xs else None


def _after(ts: list[float], t0: float, count: int) -> float | None:
    """ms from t0 until the last of `count` events, None if some never happened."""
    return 1e3 * (max(ts) - t0) if ts and len(ts) == count else None


def measure(n: int, plane: str, seconds: float, procs: int = 4, step_s: float = 0.5,
            ranks_per_node: int = 8, launcher_loop: bool = False,
            engine: str = "python", shim: bool = True) -> dict:
    """One point: N simulated ranks replay `plane` for `seconds` against a fresh `odyssey
    store` process, then the notice and the agreement. engine: "python" (threads over
    `procs` processes, the reference) or "cpp" (the compiled generator, one process).
    shim: preload store_load_cpp.resolver_env into server and generator (numeric peer
    names: no 5 s reverse-DNS stalls while connecting)."""
    layout = tr.Layout(n, ranks_per_node)
    spec = tr.plane_for(plane, launcher_loop)
    env = store_load_cpp.resolver_env() if shim else dict(os.environ)
    with store_server(env) as (port, pid), CpuSampler(pid) as cpu:
        load = os.getloadavg()[0]
        if engine == "cpp":
            raw = store_load_cpp.run(layout, spec, port, seconds, step_s, shim,
                                     on_start=lambda p: setattr(cpu, "generator_pid", p))
        else:
            raw = store_load_py.run(layout, spec, port, seconds, step_s, procs, env)
        load_end = os.getloadavg()[0]
    cores = cpu.cores(raw["t_start"], raw["t_notice"])
    t_notice = raw["t_notice"]
    lat, rec = sorted(raw["lat"]), sorted(raw["rec_lat"])
    steady = raw["rank_steady"] + raw["node_steady"]
    want_ranks, want_nodes = tr.scheduled_requests(spec, layout, step_s, seconds)
    per_rank, per_node = tr.offered_per_s(spec, layout, step_s)
    return {"ranks": n, "plane": plane, "engine": engine, "ranks_per_node": ranks_per_node,
            "nodes": layout.nodes, "launcher_loop": launcher_loop, "seconds": seconds,
            "loadavg_1m": load, "loadavg_1m_end": load_end, **cores,
            "connect_s": raw["connect_s"], "connect_max_s": raw.get("connect_max_s"),
            "resolver_shim": shim,
            "requests_per_s": steady / seconds,
            "per_rank_per_s": steady / seconds / n,
            "per_node_per_s": steady / seconds / layout.nodes,
            "rank_requests_per_rank_per_s": raw["rank_steady"] / seconds / n,
            "rank_waits_per_rank_per_s": raw["rank_steady_waits"] / seconds / n,
            "scheduled_waits_per_rank_per_s": (max(0, math.ceil(seconds / step_s - 1e-9) - 1)
                                               / seconds),
            "launcher_requests_per_s": raw["node_steady"] / seconds,
            "offered_requests_per_s": (want_ranks + want_nodes) / seconds,
            "offered_per_rank_per_s": per_rank, "offered_per_node_per_s": per_node,
            "achieved_over_offered": steady / max(1, want_ranks + want_nodes),
            "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "p999_ms": _pct(lat, 0.999),
            "samples": len(lat), "recovery_p99_ms": _pct(rec, 0.99),
            "notice_to_all_seen_ms": _after(raw["saw"], t_notice, n),
            "notice_to_all_agreed_ms": _after(raw["agreed"], t_notice, n),
            "agree_requests": raw["total"] - steady,
            "published_after_ms": (1e3 * (raw["published"] - t_notice)
                                   if raw["published"] else None),
            "notice_to_all_relays_ms": (_after(raw["relayed"], t_notice, layout.nodes)
                                        if spec.relay else None)}


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def describe(r: dict) -> str:
    """One printed line per point; a generator that fell short says so."""
    short = r["achieved_over_offered"] < ACHIEVED_MIN
    return (f"N={r['ranks']:5d} {r['plane']:>6} [{r['engine']}]: "
            f"{r['requests_per_s']:8.0f} req/s of {r['offered_requests_per_s']:.0f} offered "
            f"({r['achieved_over_offered']:.1%}; per rank {r['per_rank_per_s']:.1f} of "
            f"{r['offered_requests_per_s'] / r['ranks']:.1f}), "
            f"p50 {_fmt(r['p50_ms'], '.3f')} p99 {_fmt(r['p99_ms'], '.2f')} ms; "
            f"notice->all seen {_fmt(r['notice_to_all_seen_ms'])} ms, agreed "
            f"{_fmt(r['notice_to_all_agreed_ms'])} ms; connect {r['connect_s']:.1f} s; "
            f"cores server {_fmt(r['server_cores'], '.2f')} generator "
            f"{_fmt(r['generator_cores'], '.2f')} machine {_fmt(r['machine_busy_cores'], '.2f')}; "
            f"load {r['loadavg_1m']:.2f}"
            + ("\n    ** the load was not offered: achieved "
               f"{r['achieved_over_offered']:.0%} of the scheduled requests (< "
               f"{ACHIEVED_MIN:.0%}); past this machine's knee (server "
               f"{_fmt(r['server_cores'], '.2f')}, generator {_fmt(r['generator_cores'], '.2f')}, "
               f"machine {_fmt(r['machine_busy_cores'], '.2f')} of {os.cpu_count()} cores "
               "busy): latency here is the overloaded machine's, not the design's"
               if short else ""))


def knee(rows: list[dict]) -> dict:
    """The knee of a sweep of increasing load: the last point that kept up (achieved >=
    ACHIEVED_MIN of offered, p99 within KNEE_P99_FACTOR of the first point's, or 1 ms),
    and the first that did not."""
    base = max(1.0, KNEE_P99_FACTOR * (rows[0]["p99_ms"] or 0))
    good, broke, why = None, None, None
    for r in rows:
        if r["achieved_over_offered"] < ACHIEVED_MIN:
            broke, why = r, f"achieved {r['achieved_over_offered']:.0%} of offered"
        elif (r["p99_ms"] or 0) > base:
            broke, why = r, f"p99 {r['p99_ms']:.1f} ms > {base:.1f} ms"
        if broke:
            break
        good = r
    pick = ("ranks", "offered_requests_per_s", "requests_per_s", "p50_ms", "p99_ms",
            "server_cores", "machine_busy_cores")
    return {"plane": rows[0]["plane"], "p99_limit_ms": base, "reason": why,
            "last_good": {k: good[k] for k in pick} if good else None,
            "first_broken": {k: broke[k] for k in pick} if broke else None,
            "knee_requests_per_s": good["requests_per_s"] if good else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64,256,1024")
    ap.add_argument("--planes", default=",".join(tr.PLANES),
                    help=f"of {', '.join(PLANES)} (the -sliced ones: as before the "
                    "decision wait was woken by the notice, with the old launcher loop)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--engine", default="auto",
                    help="cpp (compiled, offers 1024+ ranks), python (threads, the "
                    "reference at small N) or auto: cpp when it builds (default)")
    ap.add_argument("--procs", type=int, default=4, help="python engine: generator processes")
    ap.add_argument("--step-s", type=float, default=0.5, help="simulated step time")
    ap.add_argument("--ranks-per-node", type=int, default=8,
                    help="ranks per simulated node (node plane: one launcher each)")
    ap.add_argument("--launcher-loop", action="store_true",
                    help="also count each launcher loop's own store reads (every plane)")
    ap.add_argument("--knee", default="poll", metavar="PLANE",
                    help="afterwards, sweep PLANE over --knee-ranks until latency or "
                    "achieved/offered breaks (default poll: the most requests per rank; "
                    "'' skips the sweep)")
    ap.add_argument("--knee-ranks", default=KNEE_RANKS)
    ap.add_argument("--no-shim", action="store_true",
                    help="do not preload benchmarks/store_load_numeric_names.c (c10d's "
                    "reverse-DNS lookups then may stall a connect, and the server, 5 s)")
    ap.add_argument("--out", default=str(out_dir() / "store_load.json"))
    args = ap.parse_args(argv)
    engine = engine_for(args.engine)
    rows, sweep, found = [], [], None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every point: a run cut short keeps what it measured
        out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "engine": engine,
            "mode": "simulated ranks, one TCPStore client each; one `odyssey store` "
                    "server process; loopback", "cpus": os.cpu_count(),
            "step_s": args.step_s, "ranks_per_node": args.ranks_per_node,
            "launcher_loop": args.launcher_loop, "seconds": args.seconds,
            "command": "python benchmarks/store_load.py " + " ".join(argv or sys.argv[1:]),
            "rows": rows, "knee_sweep": sweep, "knee": found}, indent=1))

    def point(n: int, plane: str) -> dict:
        if not 1 <= n <= MAX_RANKS[engine]:
            raise SystemExit(f"--ranks: 1..{MAX_RANKS[engine]} with the {engine} engine")
        if plane not in PLANES:
            raise SystemExit(f"--planes: one of {PLANES}")
        r = measure(n, plane, args.seconds, args.procs, args.step_s, args.ranks_per_node,
                    args.launcher_loop, engine, not args.no_shim)
        print(describe(r), flush=True)
        return r

    for n in [int(x) for x in args.ranks.split(",") if x]:
        for plane in args.planes.split(","):
            rows.append(point(n, plane))
            save()
    if args.knee:
        print(f"knee sweep: {args.knee} over N = {args.knee_ranks}", flush=True)
        for n in [int(x) for x in args.knee_ranks.split(",")]:
            sweep.append(point(n, args.knee))
            found = knee(sweep)
            save()
            if found["first_broken"]:
                break
        print(f"knee ({args.knee}): last good {found['last_good']}; first broken "
              f"{found['first_broken']} ({found['reason']})", flush=True)
        biggest = max((x["ranks"] for x in rows), default=0)
        for r in rows:
            if found["knee_requests_per_s"] and r["ranks"] == biggest:
                under = max(r["offered_requests_per_s"], r["requests_per_s"]) < found[
                    "knee_requests_per_s"]
                print(f"  N={r['ranks']} {r['plane']}: offers {r['offered_requests_per_s']:.0f}"
                      f" req/s, made {r['requests_per_s']:.0f}: "
                      f"{'under' if under else 'NOT under'} the knee "
                      f"({found['knee_requests_per_s']:.0f})", flush=True)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

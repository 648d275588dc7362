"""The compiled load generator: build store_load_gen.cpp on demand, feed it a `Plane`.

`load()` JIT-builds the extension with torch.utils.cpp_extension (g++ and ninja) into
build/store_load_gen/ (git-ignored; ~1 min the first time, cached after); `spec` compiles
a point's traffic (store_load_traffic.py) into the flat spec the C++ side replays: every
client's periodic ops with its keys resolved, the procedures' parameters and key
templates. `run` replays it in a worker process of its own (`python -m
benchmarks.store_load_cpp SPEC OUT`), with `resolver_env()` (below), and returns the same
raw parts as store_load_py.run.

Why `resolver_env`: c10d formats every socket's peer with getnameinfo(), a reverse DNS
lookup, on both sides of each connection (the server inside its event loop). Where the
resolver drops a query (this machine: about one in 25) that connection waits 5 s, the
resolver's timeout, and the server's loop with it: 1024 clients took minutes to connect.
store_load_numeric_names.c, preloaded into the server and the generator, asks for numeric
names only; requests are untouched.
"""

from __future__ import annotations

import array
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import store_load_traffic as tr

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).with_name("store_load_gen.cpp")
HEADER = Path(__file__).with_name("store_load_gen.h")
BUILD_DIR = ROOT / "build" / "store_load_gen"
SHIM_SOURCE = Path(__file__).with_name("store_load_numeric_names.c")
SHIM = BUILD_DIR / "numeric_names.so"
CONNECT_THREADS = 32
"""Threads that open the clients' connections before the run (not all at once: a burst of
1000+ connects would only measure the listen backlog)."""

_module = None
_error: str | None = None


def missing_tools() -> str | None:
    """Why the extension cannot be built here, or None."""
    for tool in ("g++", "ninja"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    return None


def load(verbose: bool = False):
    """The built extension module; raises RuntimeError (with the reason) if it cannot be
    built. Built once per process; later processes reuse build/store_load_gen/."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    reason = missing_tools()
    if reason is None:
        try:
            from torch.utils import cpp_extension

            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            # the name carries both files' hash: torch's JIT rebuilds on a change of the
            # listed source only, not of the header it includes
            digest = hashlib.sha1(SOURCE.read_bytes() + HEADER.read_bytes()).hexdigest()[:10]
            _module = cpp_extension.load(
                name=f"odyssey_store_load_gen_{digest}", sources=[str(SOURCE)],
                build_directory=str(BUILD_DIR), extra_cflags=["-O2"], verbose=verbose)
            return _module
        except Exception as err:  # a compiler error: report it, fall back to Python
            reason = f"build failed: {str(err).strip().splitlines()[-1][:300]}"
    _error = reason
    raise RuntimeError(reason)


def resolver_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) with the numeric-names shim preloaded, built on first
    use; unchanged (and the 5 s connect stalls possible) if it cannot be built."""
    env = dict(os.environ if env is None else env)
    if not SHIM.exists() and shutil.which("gcc"):
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(SHIM), str(SHIM_SOURCE),
                        "-ldl"], check=False, capture_output=True)
    if SHIM.exists():
        env["LD_PRELOAD"] = " ".join(x for x in (str(SHIM), env.get("LD_PRELOAD")) if x)
    return env


def _ops(ops: tuple[tr.Op, ...], group_of, rank: int, node: int) -> list[tuple]:
    return [(op.kind, group_of(op.slot, rank, node), op.delta) for op in ops]


def spec(layout: tr.Layout, plane: tr.Plane, port: int, seconds: float, step_s: float,
         host: str = "127.0.0.1") -> dict:
    """The C++ side's input: store_load_gen.cpp's `plan_of` reads exactly these fields."""
    groups: list[list[str]] = []
    index: dict[tuple[str, ...], int] = {}

    def group_of(slot: str, rank: int, node: int) -> int:
        keys = tuple(tr.slot_keys(slot, layout, rank, node))
        if keys not in index:
            index[keys] = len(groups)
            groups.append(list(keys))
        return index[keys]

    def every(es: tuple[tr.Every, ...], client: int, rank: int, node: int) -> list[tuple]:
        return [(e.period_s, tr.phase_s(client, e.period_s), _ops(e.ops, group_of, rank, node))
                for e in es]

    clients = []
    for node in range(layout.nodes):
        for r in layout.node_ranks(node):
            clients.append({"role": 0, "id": r, "node": node,
                            "init": _ops(plane.rank_init, group_of, r, node),
                            "every": every(plane.rank_every, r, r, node)})
        if plane.node_every:
            clients.append({"role": 1, "id": node, "node": node, "init": [],
                            "every": every(plane.node_every, layout.ranks + node, 0, node)})
        if plane.node_watch_every:  # the launcher's fence watch: a client of its own
            clients.append({"role": 1, "id": node, "node": node, "init": [],
                            "every": every(plane.node_watch_every,
                                           layout.ranks + layout.nodes + node, 0, node)})
        if plane.relay:
            clients.append({"role": 2, "id": node, "node": node, "init": [], "every": []})
    t = tr.Templates()
    return {"host": host, "port": port, "ranks": layout.ranks, "nodes": layout.nodes,
            "connect_threads": CONNECT_THREADS, "seconds": seconds, "step_s": step_s,
            "poll_s": tr.POLL_S, "agree_poll_s": tr.AGREE_POLL_S,
            "vote_slice_s": plane.vote_slice_s, "wake_on_notice": plane.wake_on_notice,
            "wake_step": tr.WAKE_STEP,
            "relay_wait_s": tr.RELAY_WAIT_S, "notice_wait_s": tr.NOTICE_WAIT_S,
            "groups": groups, "clients": clients,
            "step_reads": _ops(plane.step_reads, group_of, 0, 0),
            "last_voter_ops": _ops(plane.last_voter_ops, group_of, 0, 0),
            "vote_slice_ops": _ops(plane.vote_slice_ops, group_of, 0, 0),
            "learn_poll_ops": _ops(plane.learn_poll_ops, group_of, 0, 0),
            "agree_poll_ops": _ops(plane.agree_poll_ops, group_of, 0, 0),
            "learn": {"poll": 0, "wait": 1, "relay": 2}[plane.learn],
            "agree": {"poll": 0, "decide": 1}[plane.agree],
            "templates": {"vote": t.vote, "votes": t.votes, "decision": t.decision,
                          "abort_reason": t.abort_reason,
                          "join": t.join, "joined": t.joined, "members": t.members,
                          "notice": t.notice}}


def run(layout: tr.Layout, plane: tr.Plane, port: int, seconds: float, step_s: float,
        shim: bool = True, on_start=None) -> dict:
    """One point on the compiled generator, in a worker process (same raw parts as
    store_load_py.run). `on_start(pid)` is told the worker's pid (for CPU sampling)."""
    load()  # build here, so a compiler error is reported before any worker starts
    with tempfile.TemporaryDirectory(prefix="store_load_cpp_") as d:
        spec_path, out_path = Path(d) / "spec.pkl", Path(d) / "out.pkl"
        spec_path.write_bytes(pickle.dumps(spec(layout, plane, port, seconds, step_s)))
        env = resolver_env() if shim else dict(os.environ)
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.store_load_cpp",
                                 str(spec_path), str(out_path)], cwd=ROOT, env=env)
        if on_start is not None:
            on_start(proc.pid)
        try:
            rc = proc.wait(seconds + 600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0 or not out_path.exists():
            raise RuntimeError(f"the compiled generator's worker failed (exit {rc})")
        raw = pickle.loads(out_path.read_bytes())
    if raw["connect_error"]:
        raise RuntimeError(f"connecting the clients failed: {raw['connect_error']}")
    if raw["errors"]:
        raise RuntimeError(f"{len(raw['errors'])} clients failed, first: {raw['errors'][0]}")
    role, steady = raw["role"], raw["steady"]
    ranks = [i for i, x in enumerate(role) if x == 0]

    def us(b: bytes) -> list[float]:
        a = array.array("f")
        a.frombytes(b)
        return [v * 1e-6 for v in a]

    return {"t_start": raw["t_start"], "t_notice": raw["t_notice"],
            "connect_s": raw["connect_s"], "threads_s": raw["threads_s"],
            "connect_max_s": max(raw["connect_each_s"], default=0.0),
            "lat": us(raw["lat_us"]), "rec_lat": us(raw["rec_lat_us"]),
            "rank_steady": sum(steady[i] for i in ranks),
            "rank_steady_waits": sum(raw["steady_waits"]),
            "node_steady": sum(s for s, x in zip(steady, role) if x != 0),
            "total": sum(raw["total"]),
            "saw": [raw["saw"][i] for i in ranks if raw["saw"][i] > 0],
            "agreed": [raw["agreed"][i] for i in ranks if raw["agreed"][i] > 0],
            "relayed": [v for v, x in zip(raw["relayed"], role) if x == 2 and v > 0],
            "published": raw["published"] or None}


def _worker(spec_path: str, out_path: str) -> int:
    """The worker process: replay one spec, pickle the extension's raw result."""
    raw = load().run(pickle.loads(Path(spec_path).read_bytes()))
    Path(out_path).write_bytes(pickle.dumps(dict(raw)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))

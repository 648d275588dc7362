"""torchft baseline: what torchft does when a replica group dies, on this CPU machine.

For comparison with Odyssey's in-place recovery (docs/torchft-baseline.md says what is and
is not comparable). Setup: Odyssey's MTTR model and batch (emulated compute: 8 layers that
sleep 10 ms forward / 20 ms backward per microbatch on tiny real tensors; global batch 8
microbatches x 2 samples), trained with torchft's "DDP across replica groups": 2 replica
groups of 1 process each (each owns 4 microbatches per step), a torchft lighthouse on
127.0.0.1, torchft's ProcessGroupGloo, Manager + DistributedDataParallel + Optimizer.

Each repeat: fresh lighthouse and replicas; SIGKILL the victim group's process mid-step at
--kill-step; on the survivor measure kill -> next committed step starts (the MTTR
analogue), step times before / alone / after the rejoin, the samples that never reach a
committed update; then relaunch the victim and measure relaunch -> it trains (heal).

    python benchmarks/torchft_baseline.py                 # 3 repeats, ~4-5 min on 2 loaded cores
    python benchmarks/torchft_baseline.py --repeats 1 --no-relaunch

Needs torchft-nightly==2026.10.26 (torchft 0.2.0 from PyPI crashes survivors).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import out_dir  # noqa: E402

WORKER = ROOT / "benchmarks" / "_torchft_worker.py"
OUT = out_dir() / "torchft_baseline.json"
DATE = "2026-11-21"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec: SIGKILL the child if this driver dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def torchft_version() -> str:
    for dist in ("torchft-nightly", "torchft"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    sys.exit("torchft is not installed (pip install torchft-nightly==2026.10.26)")


def lighthouse_cmd() -> list[str]:
    script = Path(sys.executable).parent / "torchft_lighthouse"
    if not script.exists():
        found = shutil.which("torchft_lighthouse")
        if found is None:
            sys.exit("torchft_lighthouse not found")
        return [found]
    return [sys.executable, str(script)]


class Events:
    """Tails a worker's JSONL event file."""

    def __init__(self, path: Path):
        self.path, self.pos, self.items, self._part = path, 0, [], ""

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
            self.pos = f.tell()
        chunk, self._part = self._part + chunk, ""
        lines = chunk.split("\n")
        self._part = lines.pop()  # incomplete tail (or "")
        new = [json.loads(x) for x in lines if x.strip()]
        self.items += new
        return new

    def find(self, ev: str, **kw) -> list[dict]:
        return [e for e in self.items
                if e["ev"] == ev and all(e.get(k) == v for k, v in kw.items())]


class Run:
    """One repeat: lighthouse + replica groups, kill, relaunch, then tear everything down."""

    def __init__(self, args, rep: int, work: Path):
        self.args, self.rep, self.work = args, rep, work
        self.procs: list[subprocess.Popen] = []
        self.logs = []

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        f = open(log, "w")
        self.logs.append(f)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
               "GLOO_SOCKET_IFNAME": "lo", "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append(p)
        return p

    def worker(self, group: int, tag: str) -> tuple[subprocess.Popen, Events]:
        a = self.args
        ev = self.work / f"events_g{group}_{tag}.jsonl"
        cmd = [sys.executable, str(WORKER), "--group", str(group), "--num-groups", "2",
               "--lighthouse", self.lighthouse_addr, "--events", str(ev),
               "--go-file", str(self.work / "go"), "--stop-file", str(self.work / "stop"),
               "--deadline-s", str(a.run_timeout_s + 30)]
        return self.spawn(cmd, self.work / f"worker_g{group}_{tag}.log"), Events(ev)

    def stop_at(self, step: int) -> None:
        tmp = self.work / "stop.tmp"
        tmp.write_text(str(step))
        tmp.replace(self.work / "stop")

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:  # anything left in the child's session
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for f in self.logs:
            f.close()

    def run(self) -> dict:
        a = self.args
        port = free_port()
        self.lighthouse_addr = f"http://127.0.0.1:{port}"
        self.spawn(lighthouse_cmd() + [
            "--bind", f"127.0.0.1:{port}", "--min_replicas", "1",
            "--join_timeout_ms", str(a.join_timeout_ms),
            "--quorum_tick_ms", str(a.quorum_tick_ms),
            "--heartbeat_timeout_ms", str(a.heartbeat_timeout_ms)], self.work / "lighthouse.log")
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as err:
                if time.time() > deadline:
                    raise RuntimeError("lighthouse did not come up") from err
                time.sleep(0.05)

        victim, survivor = a.victim, 1 - a.victim
        procs, evs = {}, {}
        for g in (0, 1):
            procs[g], evs[g] = self.worker(g, "orig")
        t_start = time.time()
        t_kill = t_kill_done = t_relaunch = None
        new_ev = new_proc = None
        stop_sent = None
        status = "timeout"
        while time.time() - t_start < a.run_timeout_s:
            time.sleep(0.005)
            for e in list(evs.values()) + ([new_ev] if new_ev else []):
                e.poll()
            if not (self.work / "go").exists():
                if all(evs[g].find("manager_ready") for g in (0, 1)):
                    (self.work / "go").write_text("go")
                continue
            if t_kill is None:
                hit = evs[victim].find("step_start", step=a.kill_step)
                if hit and time.time() >= hit[0]["t"] + a.kill_delay_s:
                    t_kill = time.time()
                    os.killpg(procs[victim].pid, signal.SIGKILL)
                    t_kill_done = time.time()
                    procs[victim].wait(timeout=10)
                continue
            s_commits = [e for e in evs[survivor].find("step_end", committed=True)
                         if e["t_quorum"] > t_kill]
            if a.relaunch and t_relaunch is None and len(s_commits) >= a.relaunch_after_steps:
                t_relaunch = time.time()
                new_proc, new_ev = self.worker(victim, "relaunch")
            cur = max([e["step"] + 1 for e in evs[survivor].find("step_end", committed=True)]
                      or [0])
            if stop_sent is None:
                healed = (new_ev is not None and len(
                    [e for e in new_ev.find("step_end", committed=True)
                     if e["participating"]]) >= a.after_rejoin_steps)
                if (healed or not a.relaunch) and cur >= a.steps - 3:
                    stop_sent = max(cur + 3, a.steps)
                    self.stop_at(stop_sent)
            alive = [evs[survivor]] + ([new_ev] if new_ev else [])
            if stop_sent is not None and all(e.find("done") for e in alive):
                status = "ok"
                break
            if procs[survivor].poll() is not None and not evs[survivor].find("done"):
                status = f"survivor exited rc={procs[survivor].returncode}"
                break
        for e in list(evs.values()) + ([new_ev] if new_ev else []):
            e.poll()
        return {
            "status": status, "victim": victim, "survivor": survivor,
            "t_start": t_start, "t_kill": t_kill,
            "kill_call_s": (t_kill_done - t_kill) if t_kill else None,
            "t_relaunch": t_relaunch, "stop_step": stop_sent,
            "events": {"victim": evs[victim].items, "survivor": evs[survivor].items,
                       "relaunch": new_ev.items if new_ev else []},
        }


def _median(xs):
    return statistics.median(xs) if xs else None


def analyse(raw: dict, args) -> dict:
    """Turn one run's event streams into the measured figures."""
    t_kill, ev = raw["t_kill"], raw["events"]
    res: dict = {"status": raw["status"], "victim_group": raw["victim"],
                 "survivor_group": raw["survivor"], "kill_step": args.kill_step}
    if t_kill is None:
        return res
    s_ends = [e for e in ev["survivor"] if e["ev"] == "step_end"]
    commits = [e for e in s_ends if e["committed"]]
    # the in-flight step on the survivor: the first step that ended after the kill
    after = [e for e in s_ends if e["t"] > t_kill]
    failed = after[0] if after and not after[0]["committed"] else None
    rec = next((e for e in after if e["committed"] and e["t_quorum"] > t_kill), None)
    res["inflight_step_committed_on_survivor"] = bool(after and after[0]["committed"])
    if failed:
        res["survivor_noticed_s"] = failed["t_bwd"] - t_kill
        res["survivor_error"] = failed["errored"]
    if rec:
        res["mttr_s"] = rec["t_quorum"] - t_kill  # survivor starts a step that commits
        res["recovery_step"] = rec["step"]
        res["recovery_iteration_started_s"] = rec["t_iter"] - t_kill
        res["kill_to_recovered_commit_s"] = rec["t"] - t_kill
        res["recovery_step_num_participants"] = rec["num_participants"]
    # step times = intervals between consecutive commits on the survivor, by phase
    before, alone, rejoined = [], [], []
    for prev, cur in zip(commits, commits[1:]):
        dt = cur["t"] - prev["t"]
        if cur["t"] < t_kill and prev["step"] >= 1:      # skip step 0 (start-up, init sync)
            before.append(dt)
        elif rec and prev["t"] >= rec["t"]:
            if cur["num_participants"] == 1 and prev["num_participants"] == 1:
                alone.append(dt)
            elif cur["num_participants"] == 2 and prev["num_participants"] == 2:
                rejoined.append(dt)
    res["step_s_before"] = _median(before)
    res["step_s_alone"] = _median(alone)
    res["step_s_after_rejoin"] = _median(rejoined)
    res["step_s_before_all"], res["step_s_alone_all"] = before, alone
    res["step_s_after_rejoin_all"] = rejoined

    # heal: relaunch -> the new process starts a step it participates in
    n_ev = ev["relaunch"]
    if raw["t_relaunch"] is not None and n_ev:
        t_r = raw["t_relaunch"]
        first = {k: next((e["t"] for e in n_ev if e["ev"] == k), None)
                 for k in ("proc_start", "imported", "warm", "manager_ready")}
        n_starts = [e for e in n_ev if e["ev"] == "step_start"]
        n_ends = [e for e in n_ev if e["ev"] == "step_end"]
        part = next((e for e in n_starts if e["participating"]), None)
        heal_step = n_ends[0] if n_ends else None
        if part:
            res["heal_s"] = part["t"] - t_r
            # torchft's own part: the new manager is up (heartbeating) -> it trains
            res["heal_from_manager_ready_s"] = (part["t"] - first["manager_ready"]
                                                if first["manager_ready"] else None)
            res["heal_phases_s"] = {
                "spawn_to_python": first["proc_start"] - t_r if first["proc_start"] else None,
                "imports": (first["imported"] - first["proc_start"]) if first["imported"] else None,
                "warmup": (first["warm"] - first["imported"]) if first["warm"] else None,
                "manager_and_lighthouse_join": (first["manager_ready"] - first["warm"])
                if first["manager_ready"] else None,
                "quorum_and_checkpoint_fetch": (heal_step["t_quorum"] - first["manager_ready"])
                if heal_step else None,
                "non_participating_heal_step": part["t"] - heal_step["t_quorum"]
                if heal_step else None,
            }
            res["heal_first_step_participating"] = bool(heal_step and heal_step["participating"])
            res["heal_joined_step"] = heal_step["step"] if heal_step else None
            res["relaunch_to_first_participating_commit_s"] = next(
                (e["t"] - t_r for e in n_ends if e["participating"] and e["committed"]), None)
        # survivor's step that shipped the checkpoint (newcomer present but not participating)
        if heal_step:
            hs = next((e for e in commits if e["step"] == heal_step["step"]), None)
            hp = next((e for e in commits if e["step"] == heal_step["step"] - 1), None)
            if hs and hp:
                res["survivor_heal_step_s"] = hs["t"] - hp["t"]

    # samples: which of the global stream reached a committed, participating update
    final = raw["stop_step"] or max((e["step"] + 1 for e in commits), default=0)
    gb = args.microbatches * args.microbatch_size
    trained: dict[int, int] = {}
    for stream in ev.values():
        for e in stream:
            if e["ev"] == "step_end" and e["committed"] and e["participating"]:
                for s in e["sample_ids"]:
                    trained[s] = trained.get(s, 0) + 1
    expected = set(range(final * gb))
    dropped = sorted(expected - trained.keys())
    by_step: dict[int, int] = {}
    for s in dropped:
        by_step[s // gb] = by_step.get(s // gb, 0) + 1
    res["samples"] = {
        "steps": final, "expected": len(expected), "trained": len(expected & trained.keys()),
        "dropped": len(dropped), "duplicated": sum(1 for c in trained.values() if c > 1),
        "dropped_by_step": by_step,
        "dropped_inflight_step": by_step.get(args.kill_step, 0),
    }
    if rec:
        res["samples"]["steps_committed_by_survivor_alone"] = len(
            [e for e in commits if e["t_quorum"] > t_kill and e["num_participants"] == 1])
    return res


def _median_phases(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r.get("heal_phases_s", {})}
    return {k: _median([r["heal_phases_s"][k] for r in runs
                        if r.get("heal_phases_s", {}).get(k) is not None]) for k in sorted(keys)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20,
                    help="at least this many steps (more if the relaunched group needs them "
                         "to be seen participating)")
    ap.add_argument("--kill-step", type=int, default=6)
    ap.add_argument("--kill-delay-s", type=float, default=0.5,
                    help="SIGKILL this long after the victim starts --kill-step (mid-step)")
    ap.add_argument("--victim", type=int, default=1, choices=[0, 1])
    ap.add_argument("--relaunch", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--relaunch-after-steps", type=int, default=2,
                    help="relaunch once the survivor committed this many steps alone")
    ap.add_argument("--after-rejoin-steps", type=int, default=3,
                    help="keep training this many steps after the relaunched group participates")
    # lighthouse: README's documented command (min_replicas 1, tick 100 ms, join 10 s);
    # heartbeat timeout at its default, 5000 ms (nothing smaller is documented)
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=5000)
    ap.add_argument("--join-timeout-ms", type=int, default=10000)
    ap.add_argument("--quorum-tick-ms", type=int, default=100)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--microbatch-size", type=int, default=2)
    ap.add_argument("--run-timeout-s", type=float, default=240)
    ap.add_argument("--keep-logs", default=None, help="copy each run's logs/events here")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    version = torchft_version()

    runs = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="torchft_bl_") as d:
            run = Run(args, rep, Path(d))
            load0 = os.getloadavg()[0]
            t0 = time.time()
            try:
                raw = run.run()
            finally:
                run.teardown()
            res = analyse(raw, args)
            res["wall_s"] = time.time() - t0
            res["loadavg_1m_at_start"] = load0
            if args.keep_logs:
                dst = Path(args.keep_logs) / f"run{rep}"
                shutil.copytree(d, dst, dirs_exist_ok=True)
            runs.append(res)
            print(f"run {rep}: {res['status']}, MTTR {res.get('mttr_s', float('nan')):.3f} s, "
                  f"heal {res.get('heal_s', float('nan')):.2f} s, wall {res['wall_s']:.0f} s",
                  flush=True)

    ok = [r for r in runs if "mttr_s" in r]
    mttrs = [r["mttr_s"] for r in ok]
    heals = [r["heal_s"] for r in ok if "heal_s" in r]
    heals_ready = [r["heal_from_manager_ready_s"] for r in ok
                   if r.get("heal_from_manager_ready_s") is not None]

    def med(key):
        return _median([r[key] for r in ok if r.get(key) is not None])

    per_step_dead_share = args.microbatches * args.microbatch_size // 2
    report = {
        "date": DATE,
        "compute": "emulated: sleeps",
        "torchft_version": version,
        "setup": {
            "model": "odyssey emulated, 8 layers, fwd 10 ms / bwd 20 ms per layer per "
                     "microbatch, dim 16; AdamW (Odyssey's OptimizerConfig)",
            "global_batch": f"{args.microbatches} microbatches x {args.microbatch_size} "
                            "samples per step; 2 replica groups x 1 process, each owns "
                            f"{args.microbatches // 2} microbatches (static shard)",
            "torchft": "Manager(min_replica_size=1, init_sync=False, defaults otherwise: "
                       "async quorum, timeout 60 s, quorum_timeout 60 s, heartbeat_interval "
                       "100 ms, HTTP checkpoint transport) + DistributedDataParallel + "
                       "Optimizer + "
                       "ProcessGroupGloo (default 60 s timeout)",
            "lighthouse": {"min_replicas": 1, "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
                           "join_timeout_ms": args.join_timeout_ms,
                           "quorum_tick_ms": args.quorum_tick_ms},
            "kill": f"SIGKILL replica group {args.victim}'s process {args.kill_delay_s} s "
                    f"into step {args.kill_step}",
            "relaunch": args.relaunch,
        },
        "mttr_s": {"values": mttrs, "median": _median(mttrs),
                   "definition": "SIGKILL -> survivor's quorum returns and it starts the "
                                 "forward of a step that commits"},
        "kill_to_recovered_commit_s": med("kill_to_recovered_commit_s"),
        "step_s_before": med("step_s_before"),
        "step_s_after": med("step_s_alone"),
        "step_s_after_rejoin": med("step_s_after_rejoin"),
        "samples_dropped_per_failure": {
            "inflight_step": [r["samples"]["dropped_inflight_step"] for r in ok],
            "per_step_while_survivor_alone": per_step_dead_share,
            "heal_step": per_step_dead_share,
            "total_per_run": [r["samples"]["dropped"] for r in ok],
            "steps_survivor_trained_alone_per_run": [
                r["samples"].get("steps_committed_by_survivor_alone") for r in ok],
            "duplicated_per_run": [r["samples"]["duplicated"] for r in ok],
            "note": "the survivor keeps its own static share; nobody trains the dead group's "
                    "share until it has healed and participates again",
        },
        "heal_s": {"values": heals, "median": _median(heals),
                   "definition": "relaunch (Popen) -> the new process starts the forward of "
                                 "the first step it participates in",
                   "from_manager_ready": {"values": heals_ready,
                                          "median": _median(heals_ready),
                                          "definition": "its torchft Manager is up and "
                                                        "heartbeating -> same end point "
                                                        "(excludes imports and warm-up)"},
                   "phases_median_s": _median_phases(ok)} if heals else None,
        "runs": runs,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report, runs)
    print(f"wrote {args.out}")
    return 0 if len(ok) == args.repeats else 1


def print_table(report: dict, runs: list[dict]) -> None:
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    print(f"\ntorchft baseline ({report['torchft_version']}), 2 replica groups x 1 process, "
          f"emulated compute, lighthouse heartbeat timeout "
          f"{report['setup']['lighthouse']['heartbeat_timeout_ms']} ms")
    print(f"{'run':>3} {'MTTR s':>7} {'commit s':>8} {'before s':>8} {'alone s':>8} "
          f"{'rejoin s':>8} {'heal s':>7} {'ready->in':>9} {'dropped':>7} {'inflight':>8} "
          f"{'alone steps':>11} {'load':>5}")
    for i, r in enumerate(runs):
        smp = r.get("samples", {})
        print(f"{i:>3} {f(r.get('mttr_s')):>7} {f(r.get('kill_to_recovered_commit_s')):>8} "
              f"{f(r.get('step_s_before')):>8} {f(r.get('step_s_alone')):>8} "
              f"{f(r.get('step_s_after_rejoin')):>8} {f(r.get('heal_s'), 2):>7} "
              f"{f(r.get('heal_from_manager_ready_s'), 2):>9} "
              f"{smp.get('dropped', '-'):>7} {smp.get('dropped_inflight_step', '-'):>8} "
              f"{smp.get('steps_committed_by_survivor_alone', '-'):>11} "
              f"{f(r.get('loadavg_1m_at_start'), 1):>5}")
    m, h = report["mttr_s"], report["heal_s"]
    print(f"median MTTR {f(m['median'])} s; step before {f(report['step_s_before'])} s, "
          f"alone {f(report['step_s_after'])} s, after rejoin "
          f"{f(report['step_s_after_rejoin'])} s; heal {f(h['median'] if h else None, 2)} s "
          f"({f(h['from_manager_ready']['median'] if h else None, 2)} s of it after the new "
          f"manager was up)")
    print("MTTR = SIGKILL -> survivor starts a step that commits; heal = relaunch -> the "
          "relaunched group starts a step it participates in; load = 1-min load average")


if __name__ == "__main__":
    sys.exit(main())

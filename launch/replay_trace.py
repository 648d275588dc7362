"""Replay a failure trace (`ms,add|remove,nodeN`) into a live job, one rank per node.

    odyssey replay --run-dir runs/demo --trace trace.csv --world-size 8

Trace time 0 is the end of the job's step 0 (the first line of RUN_DIR/metrics.jsonl:
start-up and warm-up are not part of the trace). At each event's time a `remove` SIGKILLs
the node's rank (`odyssey inject --kind kill`, at the rank's next step, in `--phase`) and
an `add` asks the launcher for a replacement worker (`odyssey inject --kind rejoin`).
Node i of the launched job is rank i; the k-th `add` after t=0 becomes rank
world_size + k (the launcher numbers replacements in request order; so nothing else may
ask for replacements: no `--rejoin-after`), and a node lost again after it came back is
killed under its new rank. Fail-slow (`slow`) lines are
refused: a live job has no persistent slowdown to inject. Requests are signed with the job
token, read from the run directory or given with --token (as `odyssey inject` does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launch import inject
from odyssey import contract
from odyssey.control import TokenError
from odyssey.faults import STEP_PHASES
from planner.cluster.traces import TraceError, TraceEvent, load_trace


@dataclass(frozen=True)
class Injection:
    """One trace event turned into an `odyssey inject` request."""

    time_s: float
    """Seconds after the end of step 0 at which the request is sent."""
    kind: str
    """'kill' (for a `remove`) or 'rejoin' (for an `add`)."""
    node: str
    """The trace node, e.g. 'node5'."""
    rank: int
    """kill: the rank to SIGKILL; rejoin: the rank the replacement worker will get."""

    def argv(self, run_dir: str | Path, phase: str = "backward",
             token: str | None = None) -> list[str]:
        """Arguments of `odyssey inject` for this request."""
        auth = ["--token", token] if token is not None else []
        if self.kind == "rejoin":
            return ["--run-dir", str(run_dir), "--kind", "rejoin", *auth]
        return ["--run-dir", str(run_dir), "--kind", "kill", "--rank", str(self.rank),
                "--phase", phase, *auth]


def plan_injections(events: list[TraceEvent], world_size: int) -> list[Injection]:
    """Map a trace onto a job of `world_size` ranks (node i = rank i at the start).

    Events at t <= 0 must be `add`s of exactly node0..node{world_size-1}, or absent (then
    all of them are up). Raises TraceError for a trace the job cannot follow: a `slow`
    event, a node lost that is not up, a node added that is up, or every node lost."""
    if world_size < 1:
        raise TraceError(f"world_size must be >= 1, got {world_size}")
    start = [e for e in events if e.time_s <= 0]
    expected = {f"node{i}" for i in range(world_size)}
    if start:
        bad = [e for e in start if e.kind != "add"]
        if bad:
            raise TraceError(f"event at t=0 {bad[0]}: only 'add' events may start the trace")
        names = [e.node for e in start]
        if len(set(names)) != len(names) or set(names) != expected:
            raise TraceError(f"the nodes added at t=0 {sorted(set(names))} must be exactly "
                             f"node0..node{world_size - 1} (one rank per node)")
    up = {f"node{i}": i for i in range(world_size)}
    out: list[Injection] = []
    spawned = 0
    for e in sorted((e for e in events if e.time_s > 0), key=lambda e: e.time_s):
        if e.kind == "slow":
            raise TraceError(f"t={e.time_s:.3f}s {e.node}: fail-slow events cannot be "
                             "replayed into a live job")
        if e.kind == "remove":
            if e.node not in up:
                raise TraceError(f"t={e.time_s:.3f}s: remove of {e.node}, which is not up "
                                 f"(up: {sorted(up)})")
            if len(up) == 1:
                raise TraceError(f"t={e.time_s:.3f}s: remove of {e.node} would leave no rank;"
                                 " the job cannot survive that")
            out.append(Injection(e.time_s, "kill", e.node, up.pop(e.node)))
        else:
            if e.node in up:
                raise TraceError(f"t={e.time_s:.3f}s: add of {e.node}, which is already up")
            up[e.node] = world_size + spawned
            spawned += 1
            out.append(Injection(e.time_s, "rejoin", e.node, up[e.node]))
    return out


def wait_for_step0(run_dir: Path, alive=lambda: True, timeout_s: float = 600) -> float:
    """Wall time (time.time()) at which the job committed step 0."""
    metrics = run_dir / contract.METRICS_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists():
            line = metrics.read_text().partition("\n")[0]
            if line.strip():
                return float(json.loads(line)["time"])
        if not alive():
            raise RuntimeError(f"the job ended before step 0 was committed ({run_dir})")
        time.sleep(0.05)
    raise TimeoutError(f"no step 0 in {metrics} after {timeout_s:.0f} s")


def replay(injections: list[Injection], run_dir: str | Path, t0: float,
           phase: str = "backward", alive=lambda: True, token: str | None = None
           ) -> list[dict]:
    """Send each request at t0 + its time (t0: wall clock of the end of step 0). Returns
    one record per request with the wall time it was sent. Raises RuntimeError when the
    job ends first or `odyssey inject` refuses (e.g. the rank has already exited, or the
    token is not the job's)."""
    done = []
    for inj in injections:
        delay = t0 + inj.time_s - time.time()
        if delay > 0:
            time.sleep(delay)
        if not alive():
            raise RuntimeError(f"the job ended before the event at {inj.time_s:.1f} s "
                               f"({inj.kind} {inj.node}); run more steps")
        sent = time.time()
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = inject.main(inj.argv(run_dir, phase, token))
            except SystemExit as e:  # inject exits with a message when the job is gone
                rc, msg = 2, str(e)
                err.write(msg)
        if rc != 0:
            raise RuntimeError(f"odyssey inject refused {inj}: {err.getvalue().strip()}")
        done.append({**asdict(inj), "sent": sent, "sent_s": sent - t0})
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odyssey replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory of a live `odyssey run`")
    p.add_argument("--trace", required=True, help="ms,add|remove,nodeN file")
    p.add_argument("--world-size", type=int, required=True,
                   help="ranks the job was launched with (one per trace node)")
    p.add_argument("--phase", default="backward", choices=STEP_PHASES,
                   help="where in its next step a removed node's rank is killed "
                   "(default: %(default)s)")
    p.add_argument("--wait-s", type=float, default=600,
                   help="how long to wait for the job's step 0 (default: %(default)s)")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help=f"the job token (default: read RUN_DIR/{contract.TOKEN_FILE})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        injections = plan_injections(load_trace(args.trace), args.world_size)
    except TraceError as e:
        print(f"odyssey replay: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    try:
        t0 = wait_for_step0(run_dir, timeout_s=args.wait_s)
        token = inject.check_token(run_dir, args.token)
        for rec in replay(injections, run_dir, t0, args.phase, token=token):
            print(f"t={rec['sent_s']:7.2f}s {rec['kind']} {rec['node']} (rank {rec['rank']})",
                  flush=True)
    except TokenError as e:
        print(f"odyssey replay: refused: {e}; pass the job's token with --token",
              file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as e:
        print(f"odyssey replay: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Show a running job's live status: generation, members, plan, step rate, recoveries.

    odyssey status --run-dir runs/sre             # one readable block
    odyssey status --run-dir runs/sre --watch     # redrawn every --interval seconds
    odyssey status --run-dir runs/sre --json      # one JSON line (with --watch: one a refresh)

Reads the status record the job's leader keeps in the store (odyssey/status.py: every
committed step and every recovery), found through the run directory and checked with
the job token as `odyssey inject` does. Once the job has ended it says so and prints the
final state (RUN_DIR/status.json). Exit status: 0, 1 when no job runs (or ran) in the run
directory, 2 for a token that is not the job's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from launch.live_job import JobNotRunning, connect_job, job_token
from odyssey import contract
from odyssey.control import TokenError

NO_JOB = 1
USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odyssey status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory of the job (odyssey run "
                   "--run-dir)")
    p.add_argument("--watch", action="store_true", help="keep refreshing until the job ends")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between refreshes with --watch (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the record as one JSON line")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help=f"the job token (default: RUN_DIR/{contract.TOKEN_FILE})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print("odyssey status: --interval must be > 0", file=sys.stderr)
        return USAGE_ERROR
    run_dir = Path(args.run_dir)
    try:
        store, _ = connect_job(run_dir)
        job_token(store, run_dir, args.token)  # a store at that address that is this job's
    except JobNotRunning as e:
        return _ended(run_dir, args.json, str(e))
    except TokenError as e:
        print(f"odyssey status: refused: {e}; pass the job's token with --token",
              file=sys.stderr)
        return USAGE_ERROR
    tty = sys.stdout.isatty() and args.watch and not args.json
    shown = None
    while True:
        try:
            rec = _read(store)
            finished = store.check([contract.JOB_STATUS])
        except Exception:  # noqa: BLE001 - the store went away: the job has ended
            return _ended(run_dir, args.json, None)
        if rec is not None and finished:
            rec["state"] = "finished"
        raw = json.dumps(rec, separators=(",", ":"))
        if tty or raw != shown:  # a log or a pipe gets a new block only when it changed
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
            print(raw if args.json else describe(rec, run_dir, _endpoint(store)), flush=True)
            shown = raw
        if not args.watch or finished:
            return 0
        time.sleep(args.interval)


def _read(store: Any) -> dict | None:
    if not store.check([contract.STATUS_RECORD]):
        return None
    return json.loads(store.get(contract.STATUS_RECORD))


def _endpoint(store: Any) -> str | None:
    if store.check([contract.METRICS_ENDPOINT]):
        return store.get(contract.METRICS_ENDPOINT).decode()
    return None


def _ended(run_dir: Path, as_json: bool, why: str | None) -> int:
    """The job is not running: its final state if it ran, else one error line."""
    final = run_dir / contract.STATUS_FILE
    if not final.exists():
        print(f"odyssey status: {why or f'the job in {run_dir} has ended'}", file=sys.stderr)
        return NO_JOB
    rec = json.loads(final.read_text())
    if as_json:
        print(json.dumps(rec, separators=(",", ":")))
    else:
        print(f"the job in {run_dir} has finished; its final state:")
        print(describe(rec, run_dir, None))
    return 0


def describe(rec: dict | None, run_dir: Path, endpoint: str | None) -> str:
    """The record as a readable block."""
    if rec is None:
        return f"job {run_dir}: running, no step committed yet"
    plan = rec.get("plan") or {}
    rate = rec.get("steps_per_s")
    lines = [
        f"job {run_dir}: {rec['state']}, step {_num(rec.get('step'))}/{rec['steps'] - 1}, "
        f"generation {rec['generation']} (leader rank {rec.get('leader')}), "
        f"{rec['mode']} compute",
        f"  rate        {_num(rate, '.2f')} steps/s, {_num(rec.get('samples_per_s'), '.1f')} "
        f"samples/s, last step {_ms(rec.get('step_time_s'))}, loss {_num(rec.get('loss'), '.4f')}",
        f"  plan        {plan.get('kind')}: {plan.get('pipelines')} pipeline(s) x "
        f"{plan.get('stages')} stages on {plan.get('ranks')} ranks, global batch "
        f"{plan.get('global_batch')}",
        f"  members     {_members(rec.get('members') or [])}",
        f"  recoveries  {_counts(rec.get('recovery_counts') or [])}",
    ]
    last = rec.get("last_recovery")
    if last:
        lines.append(f"  last        {_recovery(last)}")
    stragglers = rec.get("stragglers") or []
    lines.append("  stragglers  " + (", ".join(
        f"rank {s['rank']} {s['factor']:.1f}x slower since step {s['since_step']}"
        for s in stragglers) or "none"))
    lines.append(f"  fenced      {rec.get('fenced') or 'none'}")
    ckpt = rec.get("checkpoint")
    lines.append("  checkpoint  " + (
        f"step {ckpt['step']}, {time.time() - ckpt['time']:.0f} s ago" if ckpt else "none"))
    if endpoint:
        lines.append(f"  metrics     http://{endpoint}/metrics")
    lines.append(f"  updated     {time.time() - rec['time']:.1f} s ago")
    return "\n".join(lines)


def _num(value: float | None, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _members(members: list[dict]) -> str:
    by_node: dict[str, list[int]] = {}
    for m in members:
        where = "-" if m.get("node") is None else f"node {m['node']} ({m.get('host')})"
        by_node.setdefault(where, []).append(m["rank"])
    return f"{len(members)} rank(s): " + "; ".join(
        f"{where}: {', '.join(map(str, ranks))}" for where, ranks in by_node.items())


def _counts(counts: list[dict]) -> str:
    total = sum(c["count"] for c in counts)
    if not total:
        return "none"
    return f"{total} (" + ", ".join(f"{c['kind']} after {c['cause']}: {c['count']}"
                                    for c in counts) + ")"


def _recovery(e: dict) -> str:
    who = e.get("ranks_lost") or e.get("newcomers")
    text = (f"gen {e['generation']}: {e['cause']} of {who} at step {e['step']} -> "
            f"{e['chosen']}, {time.time() - e['time']:.0f} s ago")
    if e.get("mttr_s") is None:
        return text + ", MTTR pending (first step of the new plan running)"
    phases = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in (e.get("phases") or {}).items())
    return text + f", MTTR {e['mttr_s'] * 1e3:.0f} ms [{phases} ms]"


if __name__ == "__main__":
    sys.exit(main())

"""Inject a fault into a running job: kill, hang, slow or raise in a rank, or add a worker.

    odyssey inject --run-dir runs/demo --rank 1 --kind kill --at-step 20 --phase backward
    odyssey inject --run-dir runs/demo --rank 2 --kind slow --factor 3 --until 60
    odyssey inject --run-dir runs/demo --kind rejoin

The request travels through the job's store (found from the run directory); each rank
reads new requests at the start of every step, so a fault fires at the requested step
(or the next one the rank starts, if that step has passed). A replacement worker is
started by the launcher and joins at the next step boundary. Requests are signed with
the job token (RUN_DIR/job-token, readable by the job's owner only, or --token); ranks and
launchers ignore requests that are not, and a wrong or missing token is refused here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.live_job import JobNotRunning, connect_job, job_token
from odyssey import contract
from odyssey.control import TokenError, sign
from odyssey.faults import KINDS, LAUNCHER_KINDS, PHASES, FaultSpec

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odyssey inject", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory of the job (odyssey run "
                   "--run-dir); its launcher-node0.json says where the store is")
    p.add_argument("--kind", required=True, choices=KINDS + LAUNCHER_KINDS,
                   help="kill: SIGKILL the rank; hang: SIGSTOP it (the job detects the stall "
                   "and fences it); slow: the rank sleeps --delay seconds once, or with "
                   "--factor computes F times slower (a straggler); raise: the rank raises "
                   "an error; rejoin: start a replacement worker")
    p.add_argument("--rank", type=int, help="the rank to hit (not for rejoin)")
    p.add_argument("--at-step", type=int, default=-1,
                   help="step at which the fault fires (default: the next step the rank runs)")
    p.add_argument("--phase", choices=PHASES, default="step",
                   help="when in the step: before it (step), or at the first forward, "
                   "backward, all-reduce or commit (default: %(default)s)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds of delay for a one-off "
                   "slow")
    p.add_argument("--factor", type=float, default=None, metavar="F",
                   help="slow: make the rank's forward and backward F (>= 1) times slower "
                   "from --at-step on (a persistent straggler) instead of one --delay")
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="with --factor: the first step no longer slowed (default: slowed to "
                   "the end)")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help=f"the job token (default: read RUN_DIR/{contract.TOKEN_FILE}, which "
                   "only the job's owner can read; visible to `ps` when given here)")
    return p


def _store(run_dir: Path):
    try:
        return connect_job(run_dir)
    except JobNotRunning as e:
        raise SystemExit(f"odyssey inject: {e}") from None


def check_token(run_dir: Path, given: str | None = None) -> str:
    """The job's token if ``given`` (or the run dir's) is it; raises TokenError if not."""
    store, _ = _store(run_dir)
    return job_token(store, run_dir, given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    store, meta = _store(run_dir)
    if store.check([contract.JOB_STATUS]):
        print(f"odyssey inject: the job has finished ({store.get(contract.JOB_STATUS).decode()})",
              file=sys.stderr)
        return 1
    try:
        token = job_token(store, run_dir, args.token)
    except TokenError as err:
        print(f"odyssey inject: refused: {err}; pass the job's token with --token",
              file=sys.stderr)
        return USAGE_ERROR
    if args.kind == "rejoin":
        i = store.add(contract.SPAWN_COUNT, 1) - 1
        key = contract.spawn_key(i)
        store.set(key, sign(token, key, json.dumps({"node": 0, "reason": "odyssey inject"})))
        print("requested a replacement worker")
        return 0
    if args.rank is None:
        print("odyssey inject: --rank is required for --kind " + args.kind, file=sys.stderr)
        return USAGE_ERROR
    known = [r for r in range(meta["world_size"] + store.add(contract.NEXT_RANK, 0))
             if store.check([contract.worker_key(r)])]
    if args.rank not in known:
        print(f"odyssey inject: unknown rank {args.rank} (this job's ranks: {known})",
              file=sys.stderr)
        return USAGE_ERROR
    if store.check([contract.exit_key(args.rank)]):
        print(f"odyssey inject: rank {args.rank} has already exited", file=sys.stderr)
        return USAGE_ERROR
    try:
        spec = FaultSpec(args.kind, args.rank, args.at_step, args.phase, args.delay,
                         args.factor, args.until).check()
    except ValueError as err:
        print(f"odyssey inject: {err}", file=sys.stderr)
        return USAGE_ERROR
    i = store.add(contract.INJECT_COUNT, 1) - 1
    key = contract.inject_key(i)
    store.set(key, sign(token, key, spec.to_text()))
    when = "at its next step" if args.at_step < 0 else f"at step {args.at_step}"
    if spec.persistent:
        until = "for good" if spec.until is None else f"until step {spec.until}"
        start = "its next step" if args.at_step < 0 else f"step {args.at_step}"
        print(f"injected a {spec.factor:g}x slowdown into rank {args.rank} from {start} {until}")
    else:
        print(f"injected {args.kind} into rank {args.rank} {when} ({args.phase})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

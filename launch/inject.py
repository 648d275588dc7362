"""Inject a fault into a running job: kill, hang, slow or raise in a rank, or add a worker.

    odyssey inject --run-dir runs/demo --rank 1 --kind kill --at-step 20 --phase backward
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
from datetime import timedelta
from pathlib import Path
from typing import Any

from launch.run_files import read_launcher_file
from odyssey import contract
from odyssey.control import TokenError, read_token, sign, token_matches
from odyssey.faults import KINDS, LAUNCHER_KINDS, PHASES, FaultSpec

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odyssey inject", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory of the job (odyssey run "
                   "--run-dir); its launcher-node0.json says where the store is")
    p.add_argument("--kind", required=True, choices=KINDS + LAUNCHER_KINDS,
                   help="kill: SIGKILL the rank; hang: SIGSTOP it (the job detects the stall "
                   "and fences it); slow: the rank sleeps --delay seconds (a straggler); "
                   "raise: the rank raises an error; rejoin: start a replacement worker")
    p.add_argument("--rank", type=int, help="the rank to hit (not for rejoin)")
    p.add_argument("--at-step", type=int, default=-1,
                   help="step at which the fault fires (default: the next step the rank runs)")
    p.add_argument("--phase", choices=PHASES, default="step",
                   help="when in the step: before it (step), or at the first forward, "
                   "backward, all-reduce or commit (default: %(default)s)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds of delay for slow")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help=f"the job token (default: read RUN_DIR/{contract.TOKEN_FILE}, which "
                   "only the job's owner can read; visible to `ps` when given here)")
    return p


def _store(run_dir: Path):
    from torch.distributed import TCPStore

    meta = read_launcher_file(str(run_dir))
    if meta is None:
        raise SystemExit(f"odyssey inject: {run_dir / contract.launcher_file(0)} not found: "
                         f"is {run_dir} the --run-dir of a job started with `odyssey run`?")
    if meta.get("exit_code") is not None:
        raise SystemExit(f"odyssey inject: the job in {run_dir} has already ended")
    try:
        return TCPStore(meta["store_addr"], int(meta["store_port"]), is_master=False,
                        timeout=timedelta(seconds=5)), meta
    except Exception as e:  # noqa: BLE001 - one clear message for any connection failure
        raise SystemExit(f"odyssey inject: cannot reach the job's store at "
                         f"{meta['store_addr']}:{meta['store_port']}: {e}") from e


def job_token(store: Any, run_dir: Path, given: str | None) -> str:
    """The token to sign with: ``given`` or the run dir's; TokenError if it is not this
    job's (checked against ``contract.TOKEN_CHECK``, which the launchers set)."""
    token = given if given is not None else read_token(str(run_dir))
    if not store.check([contract.TOKEN_CHECK]):
        raise TokenError("the job publishes no token check (launched by an older odyssey "
                         "run?): its ranks would ignore the request")
    if not token_matches(token, store.get(contract.TOKEN_CHECK).decode()):
        raise TokenError("the token is not this job's" + (
            "" if given is not None else f" ({run_dir / contract.TOKEN_FILE} is stale)"))
    return token


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
    spec = FaultSpec(args.kind, args.rank, args.at_step, args.phase, args.delay)
    i = store.add(contract.INJECT_COUNT, 1) - 1
    key = contract.inject_key(i)
    store.set(key, sign(token, key, spec.to_text()))
    when = "at its next step" if args.at_step < 0 else f"at step {args.at_step}"
    print(f"injected {args.kind} into rank {args.rank} {when} ({args.phase})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

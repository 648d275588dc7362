"""Reaching a running job from a control CLI (`odyssey inject`, `odyssey status`).

The run directory's launcher file (node 0's) says where the job's store listens; the
job token (RUN_DIR/job-token, or one given) is checked against the store's
``contract.TOKEN_CHECK``, so a command never talks to a store that is not this job's.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from launch.run_files import read_launcher_file
from odyssey import contract
from odyssey.control import TokenError, read_token, token_matches


class JobNotRunning(RuntimeError):
    """The run directory has no running job (the message says why, in one line)."""

    def __init__(self, message: str, meta: dict | None = None):
        super().__init__(message)
        self.meta = meta
        """The launcher file, if there is one (a finished job's has its exit code)."""


def connect_job(run_dir: Path, timeout_s: float = 5.0) -> tuple[Any, dict]:
    """(a client of the job's store, node 0's launcher file); JobNotRunning if none runs."""
    from torch.distributed import TCPStore  # torch loads only once a job is there

    meta = read_launcher_file(str(run_dir))
    if meta is None:
        raise JobNotRunning(f"{run_dir / contract.launcher_file(0)} not found: is {run_dir} "
                            "the --run-dir of a job started with `odyssey run`?")
    if meta.get("exit_code") is not None:
        raise JobNotRunning(f"the job in {run_dir} has already ended "
                            f"(exit {meta['exit_code']})", meta)
    try:
        return TCPStore(meta["store_addr"], int(meta["store_port"]), is_master=False,
                        timeout=timedelta(seconds=timeout_s)), meta
    except Exception as e:  # noqa: BLE001 - one clear message for any connection failure
        raise JobNotRunning(f"cannot reach the job's store at {meta['store_addr']}:"
                            f"{meta['store_port']}: {e}", meta) from e


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

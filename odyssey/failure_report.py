"""How a worker that fails tells its launcher why, so one mistake is one line.

Under `odyssey run` a failing worker writes its full traceback to
``RUN_DIR/logs/rank{r}.log`` and its cause, one line, to ``rank{r}.error.json``, and
prints nothing more: the launcher prints each distinct cause once, with the ranks that
hit it (launch/supervise.py). A failure while the trainer is being built (bad input: a
plan that does not fit the model, an unreadable file) exits with status 2, like the
launcher's own input checks; any other failure with 1. Outside `odyssey run` (torchrun,
a plain python process) the traceback goes to stderr as usual.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from odyssey import contract

BAD_INPUT = 2
"""Exit status of a worker (and of the launcher) refusing its input."""
FAILED = 1

_BAD_INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError)
"""Errors that, while the trainer is being built, mean the job was given bad input."""


def cause(exc: BaseException) -> str:
    """One line naming the error: ``ValueError: plan has 6 layers but ...``."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def exit_code(exc: BaseException, building: bool) -> int:
    """2 for bad input found while building the trainer, else 1."""
    return BAD_INPUT if building and isinstance(exc, _BAD_INPUT_ERRORS) else FAILED


def report(exc: BaseException, building: bool, env: dict[str, str] | None = None) -> int:
    """Report `exc` (being handled) as this worker's failure; returns the exit status."""
    env = dict(os.environ if env is None else env)
    code = exit_code(exc, building)
    run_dir, rank = env.get(contract.ENV_RUN_DIR), env.get("RANK")
    if not env.get(contract.ENV_LAUNCHER) or not run_dir or rank is None:
        traceback.print_exc()
        return code
    logs = Path(run_dir) / contract.WORKER_LOG_DIR
    try:
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / contract.worker_log_file(int(rank))
        log_path.write_text(traceback.format_exc())
        record = {"rank": int(rank), "cause": cause(exc), "bad_input": code == BAD_INPUT,
                  "log": str(log_path)}
        tmp = logs / (contract.worker_error_file(int(rank)) + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, logs / contract.worker_error_file(int(rank)))
    except OSError:
        traceback.print_exc()  # cannot write the log: say it here rather than not at all
    sys.stderr.flush()
    return code


def read_reports(run_dir: str | os.PathLike) -> list[dict]:
    """Every failure record under RUN_DIR/logs (the launcher's side), by rank."""
    logs = Path(run_dir) / contract.WORKER_LOG_DIR
    out = []
    for path in sorted(logs.glob(contract.worker_error_file(0).replace("0", "*", 1))):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("rank", 0))


def clear_reports(run_dir: str | os.PathLike) -> None:
    """Forget the failure records of an earlier job in this run directory."""
    logs = Path(run_dir) / contract.WORKER_LOG_DIR
    for path in logs.glob(contract.worker_error_file(0).replace("0", "*", 1)):
        path.unlink(missing_ok=True)

"""A training script's last line: build the trainer, fit, report any error once, and
leave at once (process-group destructors can hang or SIGABRT at interpreter exit).
Scripts import these from `odyssey.trainer`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Protocol

from odyssey import failure_report
from odyssey.devices import DeviceError


class Fits(Protocol):
    def fit(self) -> object: ...


def exit_cleanly(code: int = 0) -> None:
    """Leave without running process-group destructors (they can SIGABRT at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fit_and_exit(make_trainer: Callable[[], Fits]) -> None:
    """Build the trainer (`make_trainer()`) and fit; on an error, report it (one line
    for an error the same on every rank, a report file otherwise) and exit with its
    status; exit 0 after a fit."""
    building = True
    try:
        trainer = make_trainer()
        building = False
        trainer.fit()
    except DeviceError as e:  # the same on every rank: one line (rank 0's), no traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        exit_cleanly(2)
    except BaseException as e:
        exit_cleanly(failure_report.report(e, building))
    exit_cleanly(0)

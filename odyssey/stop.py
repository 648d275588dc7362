"""A graceful stop: every rank leaves at the same step boundary.

A launcher that receives SIGTERM/SIGINT sets `contract.STOP_REQUEST` (signed with the job
token). A rank that sees it before starting step s writes s to `contract.STOP_AT` with a
compare-and-set; the first writer wins, and every writer writes the same s: a rank can
only be at boundary s once step s-1 committed, which needed every member's vote, so no
member is past boundary s nor before it. A member already inside step s learns of the
stop through the generation's notice (published by the rank that set STOP_AT), aborts
the step, and finds STOP_AT set. Then every rank checkpoints step s-1 and exits 0.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from odyssey import contract
from odyssey.control import CommandGate

log = logging.getLogger("odyssey.stop")


class StopWatch:
    """Checks for a stop request at step boundaries (odyssey/step_controls.py)."""

    def __init__(self, store: dist.Store, rank: int, token: str | None):
        self.store = store
        self._gate = CommandGate(token, log, f"rank {rank}")
        self.reason: str | None = None

    def stop_before(self, step: int, known: dict) -> bool:
        """True if the job stops before `step` (this rank may be the one that decides).
        `known`: the step-boundary reads (odyssey/step_controls.read, usually from the
        last commit decision): no store request unless they name a stop request."""
        if known["stop_at"] is not None:
            return True
        if not known["stop"] or not self.store.check([contract.STOP_REQUEST]):
            return False
        text = self._gate.open(contract.STOP_REQUEST,
                               self.store.get(contract.STOP_REQUEST).decode())
        if text is None:
            return False
        self.reason = text
        self.store.compare_set(contract.STOP_AT, "", str(step))
        return True

    def agreed(self) -> int | None:
        """The step the job stops before, once some rank has decided it."""
        if not self.store.check([contract.STOP_AT]):
            return None
        return int(self.store.get(contract.STOP_AT).decode())

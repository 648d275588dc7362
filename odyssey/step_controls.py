"""The store reads every rank needs at each step boundary, made once per step.

Before step s a rank must know whether a stop was requested (or already agreed) and
whether `odyssey inject` wrote a new request. Asked by every rank at every step, that
was three requests per rank per step, the largest per-rank term of the control plane's
load at 1024 ranks after the vote itself. Now the last voter of step s-1 reads them once
and writes them into the commit decision (`CommitProtocol(control=read)`), which every
rank reads anyway: at boundary s every member holds the same answer. A rank without one
(the first step of a generation, after an aborted step) reads the store itself.
"""

from __future__ import annotations

import torch.distributed as dist

from odyssey import contract


def read(store: dist.Store) -> dict:
    """{"stop": a stop request exists, "stop_at": the agreed stop step or None,
    "inject": the inject request count}: three requests (four with an agreed stop)."""
    stop_at = None
    if store.check([contract.STOP_AT]):
        stop_at = int(store.get(contract.STOP_AT).decode())
    return {"stop": bool(store.check([contract.STOP_REQUEST])), "stop_at": stop_at,
            "inject": int(store.add(contract.INJECT_COUNT, 0))}

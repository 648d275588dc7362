"""The store reads every rank needs at each step boundary, made once per step.

Before step s a rank must know whether a stop was requested (or already agreed) and
whether `odyssey inject` wrote a new request. Asked by every rank at every step, that
was three requests per rank per step, the largest per-rank term of the control plane's
load at 1024 ranks after the vote itself. Now the last voter of step s-1 reads them once
and writes them into the commit decision (`CommitProtocol(control=read)`), which every
rank reads anyway: at boundary s every member holds the same answer. A rank without one
(the first step of a generation, after an aborted step) reads the store itself.

A two-phase generation's switch request travels the same way; its leader asks only
after a step of the generation committed, so a rank reading the store itself (the first
step) never sees it and every member sees it at the same boundary.
"""

from __future__ import annotations

import torch.distributed as dist

from odyssey import contract


def read(store: dist.Store, switch_gen: int | None = None) -> dict:
    """{"stop": a stop request exists, "stop_at": the agreed stop step or None,
    "inject": the inject request count}: three requests (four with an agreed stop).
    With `switch_gen` (a two-phase generation) also "switch": whether its leader asked
    for the switch (one more request)."""
    stop_at = None
    if store.check([contract.STOP_AT]):
        stop_at = int(store.get(contract.STOP_AT).decode())
    out = {"stop": bool(store.check([contract.STOP_REQUEST])), "stop_at": stop_at,
           "inject": int(store.add(contract.INJECT_COUNT, 0))}
    if switch_gen is not None:
        out["switch"] = bool(store.check([contract.switch_key(switch_gen)]))
    return out

"""Replacement-worker requests as one node's launcher sees them.

A request is a signed JSON `{"node", "reason"}` under `odyssey/spawn/{i}`, counted by
`odyssey/spawn/count` (the writer bumps the count first, then sets the key). Anyone with
the job token may write one (`odyssey inject --kind rejoin`, a launcher's
`--rejoin-after` after a worker failed); every launcher reads them all, in order, and
starts the ones for its node.
"""

from __future__ import annotations

import json
import logging
import time

from launch.store import SafeStore
from odyssey import contract
from odyssey.control import CommandGate, sign

log = logging.getLogger("launch")

SLOW_POLL_S = 0.5
"""Period of the launcher's looks at the replacement counter (and the job status): half
a second later for a replacement (whose start takes seconds) costs nothing, and at 1024
ranks a faster look was a fifth of the launchers' store load."""

WRITE_WAIT_S = 5.0
"""A request counted but not yet written is waited for this long, then skipped."""


class Replacements:
    """This node's view of the job's replacement requests."""

    def __init__(self, store: SafeStore, token: str | None, node_rank: int,
                 gate: CommandGate):
        self.store, self.token, self.node_rank, self.gate = store, token, node_rank, gate
        self._due: list[float] = []  # monotonic times of --rejoin-after requests to write
        self._seen = 0
        self._missing_since: float | None = None
        self._checked = 0.0

    def request_after(self, delay_s: float) -> None:
        """Ask for a replacement for this node `delay_s` from now (`--rejoin-after`)."""
        self._due.append(time.monotonic() + delay_s)

    def poll(self) -> list[tuple[int, str]]:
        """Write the requests that fell due; (index, reason) of each new request for this
        node, in order (index: the job's next rank counter, taken here)."""
        now = time.monotonic()
        for due in [d for d in self._due if d <= now]:
            self._due.remove(due)
            i = self.store.add(contract.SPAWN_COUNT, 1) - 1
            key = contract.spawn_key(i)
            self.store.set(key, sign(self.token, key, json.dumps(
                {"node": self.node_rank, "reason": "--rejoin-after"})))
        if now - self._checked < SLOW_POLL_S:
            return []
        self._checked = now
        count = self.store.add(contract.SPAWN_COUNT, 0)
        out = []
        while self._seen < count:
            key = contract.spawn_key(self._seen)
            if not self.store.check(key):
                self._missing_since = self._missing_since or now
                if now - self._missing_since < WRITE_WAIT_S:
                    return out  # its writer counted it and is about to set it
                log.warning("replacement request %s never written: skipped", key)
            self._missing_since = None
            self._seen += 1
            text = self.store.get_text(key) if self.store.check(key) else None
            command = self.gate.open(key, text) if text else None
            if command is None:
                continue
            try:
                request = json.loads(command)
                node = int(request.get("node", 0))
            except (ValueError, TypeError, AttributeError):
                log.warning("ignoring %s: not a replacement request: %r", key, command[:80])
                continue
            if node == self.node_rank:
                out.append((self.store.add(contract.NEXT_RANK, 1) - 1,
                            str(request.get("reason", "requested"))))
        return out

"""Replica checks: every holder of a layer must hold the same bits.

Each member publishes a digest per layer it holds (`Engine.layer_digests`); the lowest
member compares them and publishes the verdict every member waits for. A recovery checks
the layers whose state it moved (`RecoveryConfig.verify`), the end of training all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract
from odyssey.comm import StepAborted


class ReplicaCheck:
    """One rank's side of the replica comparisons."""

    def __init__(self, store: dist.Store, rank: int,
                 digests: Callable[[set[int] | None], dict[int, str]],
                 abort_check: Callable[[], str | None], poll_s: float):
        self.store, self.rank, self.digests = store, rank, digests
        self.abort_check, self.poll = abort_check, timedelta(seconds=poll_s)

    def compare(self, members: list[int], tag: str, layers: set[int] | None = None) -> str:
        """"ok", or which layers' replicas differ, among `members` (all of them call
        this with the same `tag`); `layers`: only those (None: every held layer)."""
        mine = self.digests(layers)
        self.store.set(contract.checksum_key(tag, self.rank), json.dumps(mine))
        key = contract.verdict_key(tag)
        if self.rank == min(members):
            raw = self._wait_all([contract.checksum_key(tag, r) for r in members])
            digests: dict[int, set[str]] = {}
            for v in raw:
                for i, d in json.loads(v).items():
                    digests.setdefault(int(i), set()).add(d)
            bad = sorted(i for i, ds in digests.items() if len(ds) > 1)
            self.store.set(key, "ok" if not bad else f"replicas of layers {bad} differ")
        return self._wait_all([key])[0].decode()

    def _wait_all(self, wanted: list[str]) -> list[bytes]:
        while True:
            try:
                self.store.wait(wanted, self.poll)
                return self.store.multi_get(wanted)
            except dist.DistStoreError:
                reason = self.abort_check()
                if reason:
                    raise StepAborted(f"during the state check: {reason}") from None

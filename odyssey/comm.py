"""Process groups of one generation, built for abandonable communication.

Every op is asynchronous and every wait can be abandoned: a rank waiting on a peer
wakes every `poll_s` to ask whether the step was aborted, so no survivor sits in a
timeout when a peer dies. Gloo's p2p `recv` cannot be polled (its work never reports
completion before `wait`, and a timed `wait` closes the connection), so point-to-point
traffic rides on 2-member groups as a broadcast from the sender, one group per
one-directional channel. Collective works complete futures, which we can wait on with a
timeout without touching the connection.

Groups are created without the default process group (`ProcessGroupGloo(store, ...)`),
so several generations, or several ranks as threads of one process, coexist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from odyssey import contract
from planner.program import Channel, Program


class StepAborted(RuntimeError):
    """The step in flight was aborted (a peer failed or the job asked to stop)."""


class CommError(RuntimeError):
    """A communication op failed (e.g. a peer's connection closed)."""


@dataclass(frozen=True)
class CommConfig:
    """How this rank communicates."""

    backend: str = "gloo"
    """'gloo' (CPU) or 'nccl' (CUDA)."""
    host: str = "127.0.0.1"
    """Address this rank's gloo transport binds to (its node's address on a cluster)."""
    timeout_s: float = 60.0
    """Last-resort timeout of a single op inside the backend."""
    poll_s: float = 0.02
    """How often a waiting rank checks whether the step was aborted."""
    setup_timeout_s: float = 10.0
    """How long creating a group may wait for its members (a member that died during a
    recovery must not hold the survivors for the whole op timeout)."""


class Pending:
    """An op in flight; `Comm.wait` completes it."""

    __slots__ = ("work", "done", "what", "tensor")

    def __init__(self, work, what: str, tensor: torch.Tensor):
        self.work = work
        self.what = what
        self.tensor = tensor  # keep the buffer alive until the op completes
        self.done = threading.Event()
        work.get_future().add_done_callback(lambda _f: self.done.set())


class Comm:
    """The groups one rank uses in one generation of a job."""

    def __init__(
        self,
        store: dist.Store,
        worker_id: int,
        generation: int,
        cfg: CommConfig | None = None,
        abort_check: Callable[[], str | None] | None = None,
    ):
        self.store = store
        self.worker_id = worker_id
        self.generation = generation
        self.cfg = cfg or CommConfig()
        self.abort_check = abort_check or (lambda: None)
        self._groups: dict[str, tuple[dist.ProcessGroup, tuple[int, ...]]] = {}

    # ---- setup ---------------------------------------------------------------------
    def _new_group(self, name: str, members: tuple[int, ...]) -> dist.ProcessGroup:
        prefix = contract.group_prefix(self.generation, name)
        pstore = dist.PrefixStore(prefix, self.store)
        rank, size = members.index(self.worker_id), len(members)
        timeout = timedelta(seconds=self.cfg.timeout_s)
        setup = timedelta(seconds=min(self.cfg.setup_timeout_s, self.cfg.timeout_s))
        try:
            if self.cfg.backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.cfg.host)]
                opts._timeout = setup
                opts._threads = 1
                pg = dist.ProcessGroupGloo(pstore, rank, size, opts)
                pg._set_default_timeout(timeout)
                return pg
        except (RuntimeError, dist.DistStoreError) as e:
            raise CommError(f"could not build group {name} {list(members)}: {e}") from e
        if self.cfg.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            return dist.ProcessGroupNCCL(pstore, rank, size, opts)
        raise ValueError(f"unknown backend {self.cfg.backend!r} (expected 'gloo' or 'nccl')")

    def setup(self, program: Program, extra: list[Channel] | None = None) -> Comm:
        """Create every group of `program` (and `extra` channels) this rank belongs to.

        Creation is a barrier among a group's members; visiting groups in one global
        order on every rank makes the sequence of barriers deadlock-free.
        """
        wanted: list[tuple[tuple[int, ...], str]] = []
        for ch in [*program.channels(), *(extra or [])]:
            wanted.append(((ch.src, ch.dst), _channel_key(ch)))
        for members in program.allreduce_groups():
            wanted.append((members, "ar-" + "-".join(map(str, members))))
        for members, name in sorted(wanted, key=lambda w: (sorted(w[0]), w[1])):
            if self.worker_id in members and name not in self._groups:
                self._groups[name] = (self._new_group(name, members), members)
        return self

    def close(self) -> None:
        self._groups.clear()

    # ---- ops -----------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, kind: str) -> Pending:
        pg, _ = self._groups[_channel_key(Channel(self.worker_id, dst, kind))]
        return Pending(pg.broadcast([tensor], _root0()), f"send {kind} to {dst}", tensor)

    def recv(self, tensor: torch.Tensor, src: int, kind: str) -> Pending:
        pg, _ = self._groups[_channel_key(Channel(src, self.worker_id, kind))]
        return Pending(pg.broadcast([tensor], _root0()), f"recv {kind} from {src}", tensor)

    def allreduce(self, tensor: torch.Tensor, members: tuple[int, ...]) -> Pending:
        pg, _ = self._groups["ar-" + "-".join(map(str, members))]
        return Pending(pg.allreduce([tensor]), f"allreduce {list(members)}", tensor)

    def wait(self, pending: Pending) -> torch.Tensor:
        """Block until `pending` completes; raise `StepAborted` if the step is aborted."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while not pending.done.wait(self.cfg.poll_s):
            reason = self.abort_check()
            if reason:
                raise StepAborted(f"{pending.what} abandoned: {reason}")
            if time.monotonic() > deadline:
                raise CommError(f"{pending.what} timed out after {self.cfg.timeout_s:.0f}s")
        try:
            pending.work.wait()
        except RuntimeError as e:
            raise CommError(f"{pending.what} failed: {e}") from e
        return pending.tensor


def _channel_key(ch: Channel) -> str:
    return "ch-" + ch.name


def _root0() -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts

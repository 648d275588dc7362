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

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from odyssey import contract
from odyssey.devices import BACKENDS, DEVICES
from planner.program import Channel, Program

log = logging.getLogger(__name__)
_SLOW_GROUP_S = 5.0  # group builds take milliseconds; past this one is worth a log line


class StepAborted(RuntimeError):
    """The step in flight was aborted (a peer failed or the job asked to stop)."""


class CommError(RuntimeError):
    """A communication op failed (e.g. a peer's connection closed)."""


class AbortHung(RuntimeError):
    """Aborting an NCCL communicator did not return in time (see CommConfig)."""


@dataclass(frozen=True)
class CommConfig:
    """How this rank communicates."""

    device: str = "cpu"
    """Where layers, batches and buffers live: cpu, cuda (cuda:LOCAL_RANK, or the only
    visible GPU shared over gloo) or auto (cuda when a GPU is visible, else cpu)."""
    backend: str = "auto"
    """Communication backend: auto (nccl on cuda, gloo on cpu), gloo (CPU or CUDA tensors;
    several ranks may share a GPU) or nccl (one GPU per rank)."""
    host: str = "127.0.0.1"
    """Address this rank's gloo transport binds to (its node's address on a cluster)."""
    timeout_s: float = 60.0
    """Last-resort timeout of a single op inside the backend."""
    poll_s: float = 0.02
    """How often a waiting rank checks whether the step was aborted."""
    setup_timeout_s: float = 10.0
    """How long creating a recovery's groups may wait for their members (a member that
    died during a recovery must not hold the survivors for the whole op timeout). The
    first generation's groups wait `timeout_s`: ranks reach them at their own pace."""
    abort_timeout_s: float = 10.0
    """NCCL: how long aborting the old generation's communicators may take before this
    rank gives up on them and leaves the job (its launcher records the exit, the others
    go on without it)."""
    share_device: bool = True
    """gloo: one transport device (one listening socket) for all of a generation's groups
    of this rank, instead of one per group; building the groups of a recovery then takes
    about half as long (docs/BENCHMARKS.md, issue 18). False: one device per group."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"comm.device must be one of {DEVICES}, got {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"comm.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("timeout_s", "poll_s", "setup_timeout_s", "abort_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"comm.{name} must be > 0, got {getattr(self, name)}")


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
        self._device = None  # the gloo device all groups share (CommConfig.share_device)

    def _gloo_device(self):
        if not self.cfg.share_device:
            return dist.ProcessGroupGloo.create_device(hostname=self.cfg.host)
        if self._device is None:
            self._device = dist.ProcessGroupGloo.create_device(hostname=self.cfg.host)
        return self._device

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
                opts._devices = [self._gloo_device()]
                opts._timeout = setup
                opts._threads = 1
                pg = dist.ProcessGroupGloo(pstore, rank, size, opts)
                pg._set_default_timeout(timeout)
                return pg
        except (RuntimeError, dist.DistStoreError) as e:
            raise CommError(f"could not build group {name} {list(members)}: {e}") from e
        if self.cfg.backend == "nccl":
            return _nccl_group(pstore, rank, size, timeout)
        raise ValueError(f"backend {self.cfg.backend!r} is not resolved (expected 'gloo' or "
                         "'nccl'; odyssey.devices.resolve_backend picks one)")

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
            self._ensure(name, members)
        return self

    def open_channels(self, channels: list[Channel]) -> Comm:
        """Create the 2-member groups of `channels` this rank is in (a barrier with each
        peer, in the given order)."""
        for ch in channels:
            self._ensure(_channel_key(ch), (ch.src, ch.dst))
        return self

    def _ensure(self, name: str, members: tuple[int, ...]) -> None:
        """Build group `name` unless this rank is not in it or already has it."""
        if self.worker_id not in members or name in self._groups:
            return
        t0 = time.monotonic()
        self._groups[name] = (self._new_group(name, members), members)
        took = time.monotonic() - t0
        if took > _SLOW_GROUP_S:  # a member late, or a stalled store: say which
            log.warning("rank %d: group %s %s of generation %d took %.1f s to build",
                        self.worker_id, name, list(members), self.generation, took)

    def close(self) -> None:
        self._groups.clear()

    def abort(self) -> None:
        """End this generation's communicators before the next generation builds its own.

        Gloo has no shutdown (its groups are simply never used again). NCCL communicators
        are aborted (ncclCommAbort), all groups in parallel threads, so kernels stuck on a
        dead peer release the GPU; `AbortHung` when that takes over `abort_timeout_s`."""
        if self.cfg.backend != "nccl" or not self._groups:
            return
        groups = [pg for pg, _ in self._groups.values()]
        self._groups.clear()
        threads = [threading.Thread(target=_abort_quietly, args=(pg,), daemon=True,
                                    name="odyssey-nccl-abort") for pg in groups]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.cfg.abort_timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            raise AbortHung(f"{stuck} of {len(groups)} NCCL communicator(s) of generation "
                            f"{self.generation} did not abort within "
                            f"{self.cfg.abort_timeout_s:.0f}s")

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


def _nccl_group(store: dist.Store, rank: int, size: int, timeout: timedelta
                ) -> dist.ProcessGroup:
    """An NCCL group that reports errors instead of ending the process: non-blocking
    communicator init (errors surface on the first op, which the monitor watches) and an
    op timeout equal to ours, so the watchdog only aborts what we would abandon anyway."""
    if not dist.is_nccl_available():
        raise CommError("this torch build has no NCCL (use --comm.backend gloo)")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    if hasattr(opts, "config") and hasattr(opts.config, "blocking"):
        opts.config.blocking = False
    return dist.ProcessGroupNCCL(store, rank, size, opts)


def _abort_quietly(pg: dist.ProcessGroup) -> None:
    try:
        pg.abort()
    except Exception:  # an already-broken communicator may refuse: it is gone either way
        pass

"""Spawning worker processes, building their environment, and signalling them.

:class:`ProcessBackend` is the default backend of :func:`launch.supervise.supervise`:
this node's workers as local child processes (the Ray backend runs them in actors).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from launch.node_liveness import make_liveness_dir, remove_liveness_dir
from odyssey import contract
from odyssey.netaddr import interface_of, is_loopback

log = logging.getLogger("launch")

_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pdeathsig.py")


@dataclass(frozen=True)
class JobLayout:
    """Where one node's workers sit in the job and how they reach the launcher."""

    world_size: int
    nnodes: int
    node_rank: int
    rank_offset: int
    """Global rank of this node's local rank 0."""
    nproc: int
    store_addr: str
    store_port: int
    run_dir: str
    run_id: str = "none"
    role: str = "default"
    host: str = "127.0.0.1"
    """This node's address: its workers bind and advertise it (``ODYSSEY_HOST``)."""
    token: str | None = None
    """The job token workers sign control commands with (``ODYSSEY_TOKEN``)."""

    def global_rank(self, local_rank: int) -> int:
        """Global rank of ``local_rank`` on this node."""
        return self.rank_offset + local_rank


def worker_env(
    layout: JobLayout, local_rank: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for one worker: the caller's env plus torchrun's and Odyssey's variables.

    ``MASTER_ADDR``/``MASTER_PORT`` point at the launcher-hosted store and
    ``TORCHELASTIC_USE_AGENT_STORE=True`` makes ``init_process_group("gloo")`` connect to it
    as a client, so no worker (not even rank 0) hosts a store that would die with it.
    """
    env = dict(os.environ if base is None else base)
    rank = layout.global_rank(local_rank)
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(layout.world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(layout.nproc),
            "GROUP_RANK": str(layout.node_rank),
            "GROUP_WORLD_SIZE": str(layout.nnodes),
            "ROLE_RANK": str(rank),
            "ROLE_NAME": layout.role,
            "ROLE_WORLD_SIZE": str(layout.world_size),
            "MASTER_ADDR": layout.store_addr,
            "MASTER_PORT": str(layout.store_port),
            # Odyssey never restarts workers, so every worker is in attempt 0.
            "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": layout.run_id,
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            contract.ENV_STORE_ADDR: layout.store_addr,
            contract.ENV_STORE_PORT: str(layout.store_port),
            contract.ENV_RUN_DIR: layout.run_dir,
            contract.ENV_LAUNCHER: "1",
            contract.ENV_HOST: layout.host,
        }
    )
    if layout.token is not None:
        env[contract.ENV_TOKEN] = layout.token
    if not is_loopback(layout.host):
        # For scripts that call init_process_group("gloo") themselves: without it gloo
        # binds the address the host name resolves to, often 127.0.0.1 in containers.
        ifname = interface_of(layout.host)
        if ifname is not None:
            env.setdefault(contract.ENV_GLOO_IFNAME, ifname)
    # User settings win for these; the defaults keep 2-core boxes usable and silence
    # TCPStore's per-timeout warnings, which workers polling the store trigger constantly.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return env


@dataclass
class Worker:
    """One running (or finished) worker process."""

    rank: int
    local_rank: int
    proc: subprocess.Popen
    exit: contract.ExitRecord | None = field(default=None)
    liveness_dir: str | None = field(default=None)
    """Node-local directory of the "node" control plane this worker was given (its
    launcher reads its heartbeat there; launch/node_liveness.py), None if none."""
    wake_fd: int | None = field(default=None)
    """Write end of the worker's wake-up pipe (node control plane), None if none."""

    @property
    def pid(self) -> int:
        """Process id (the shim ``exec``s the worker, so this is the worker's pid)."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """True until the exit has been reaped and recorded."""
        return self.exit is None


def spawn(cmd: Sequence[str], env: Mapping[str, str], rank: int, local_rank: int,
          default_signals: bool = False, pass_fds: Sequence[int] = ()) -> Worker:
    """Start ``cmd`` as a worker in its own session, killed if this launcher dies.

    Its own session (and so process group) lets us signal the worker together with any
    children it forks, and keeps a terminal's Ctrl-C from reaching workers directly: the
    launcher decides what they get. ``default_signals`` unblocks and resets to their
    defaults the signals this process blocks or ignores (a Ray actor blocks SIGINT).
    """
    flag = ["--default-signals"] if default_signals else []
    argv = [sys.executable, "-I", "-S", _SHIM, str(os.getpid()), *flag, *cmd]
    proc = subprocess.Popen(argv, env=dict(env), start_new_session=True, close_fds=True,
                            pass_fds=tuple(pass_fds))
    return Worker(rank=rank, local_rank=local_rank, proc=proc)


def signal_group(worker: Worker, sig: int) -> None:
    """Send ``sig`` to the worker's process group (its children too); ignore if gone."""
    remote = getattr(worker.proc, "signal_group", None)
    if remote is not None:  # a worker in a Ray actor (launch.ray_backend) signals itself
        remote(sig)
        return
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        # Group already empty; the worker itself may still need reaping, which is fine.
        pass
    except PermissionError:
        _signal_pid(worker.pid, sig)


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_leftovers(worker: Worker) -> None:
    """SIGKILL whatever is left in a finished worker's process group (its orphans).

    The group id is the worker's pid; Linux does not reuse a pid while a process group
    of that id still exists, so this cannot hit an unrelated process.
    """
    remote = getattr(worker.proc, "kill_leftovers", None)
    if remote is not None:  # a worker in a Ray actor (launch.ray_backend)
        remote()
        return
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def hostname() -> str:
    """This machine's name, for records and logs."""
    return socket.gethostname()


class ProcessBackend:
    """This node's workers as child processes of the launcher (``--backend torchrun``)."""

    def __init__(self, cmd: Sequence[str], layout: JobLayout) -> None:
        self.cmd = list(cmd)
        self.layout = layout
        self.liveness_dir = make_liveness_dir()  # this launcher sits beside its workers

    def _spawn(self, env: dict[str, str], rank: int, local_rank: int) -> Worker:
        read_end, write_end = os.pipe()  # the node plane's wake-up, see Worker.wake_fd
        os.set_blocking(write_end, False)
        env[contract.ENV_LIVENESS_DIR] = self.liveness_dir
        env[contract.ENV_LIVENESS_WAKE_FD] = str(read_end)
        try:
            worker = spawn(self.cmd, env, rank, local_rank, pass_fds=(read_end,))
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        worker.liveness_dir, worker.wake_fd = self.liveness_dir, write_end
        return worker

    def start_workers(self) -> Iterator[Worker]:
        """Spawn one worker per local rank, yielding each as soon as it runs."""
        for local_rank in range(self.layout.nproc):
            yield self._spawn(worker_env(self.layout, local_rank),
                              self.layout.global_rank(local_rank), local_rank)

    def start_replacement(self, rank: int, local_rank: int) -> Worker:
        """Spawn a replacement worker that joins the running job as ``rank``."""
        env = worker_env(self.layout, local_rank)
        env.update({"RANK": str(rank), contract.ENV_JOIN: "1"})
        return self._spawn(env, rank, local_rank)

    def worker_record(self, worker: Worker) -> dict[str, Any]:
        """The spawn record of ``worker`` (``odyssey/workers/{rank}``)."""
        return {"rank": worker.rank, "pid": worker.pid, "node": self.layout.node_rank,
                "host": hostname()}

    def describe(self) -> str:
        """Where the workers run, for the start-up log line."""
        first = self.layout.rank_offset
        return (f"{self.layout.nproc} worker(s) (ranks {first}..{first + self.layout.nproc - 1}"
                f" of {self.layout.world_size}), workers bind {self.layout.host}")

    def launcher_info(self, final: bool) -> dict[str, Any]:
        """Backend-specific fields of the launcher file (none beyond the common ones)."""
        return {"host": hostname()}

    def release(self) -> None:
        """Remove the liveness directory (the supervision loop reaps every process)."""
        remove_liveness_dir(self.liveness_dir)


def kill_all_now(workers: Sequence[Worker]) -> None:
    """Last-resort cleanup on an unexpected launcher error: SIGKILL and reap everything."""
    for worker in workers:
        if worker.proc.poll() is None:
            signal_group(worker, signal.SIGKILL)
    for worker in workers:
        try:
            worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("rank %d (pid %d) did not die after SIGKILL", worker.rank, worker.pid)
        kill_leftovers(worker)

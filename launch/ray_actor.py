"""The Ray side of ``--backend ray``: the actor that runs a worker, and its driver handle.

:class:`WorkerHost` is the actor body (one per worker, in its own placement-group bundle);
:class:`ActorProc` is what the driver's supervision loop (:mod:`launch.agent`) polls in
place of a ``Popen``. Nothing here imports ray at module level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
from typing import Any

from launch.workers import JobLayout, Worker, kill_leftovers, signal_group, spawn, worker_env

log = logging.getLogger("launch")


class WorkerHost:
    """The body of one worker actor: runs the training script as a child process.

    An async actor, so ``wait`` (which lasts the whole run) and ``signal`` interleave on
    one event-loop thread; the child is spawned from that long-lived thread, which
    matters because ``PR_SET_PDEATHSIG`` fires when the spawning *thread* ends. The child
    is tied to this actor's process the same way a torchrun-path worker is tied to its
    launcher: if the actor dies, the kernel SIGKILLs the child.
    """

    def __init__(self) -> None:
        self.worker: Worker | None = None

    async def where(self) -> dict[str, Any]:
        """Which node this actor landed on (for the records and GROUP_RANK)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "actor_pid": os.getpid()}

    async def start(self, cmd: list[str], layout: JobLayout, cwd: str,
                    extra_env: dict[str, str]) -> int:
        """Start the training script with the launcher's worker environment; its pid.

        The worker binds and advertises this actor's node IP, as a torchrun-path worker
        binds its node's address.
        """
        import ray

        layout = dataclasses.replace(layout, host=ray.util.get_node_ip_address())
        env = worker_env(layout, 0)
        env.update(extra_env)
        if os.path.isdir(cwd):  # same path on this node: relative script paths work
            os.chdir(cwd)
        self.worker = spawn(cmd, env, layout.rank_offset, 0, default_signals=True)
        return self.worker.pid

    async def wait(self, poll_s: float = 0.02) -> int:
        """Block until the child exits; clean up its process group; its return code."""
        while self.worker is None or self.worker.proc.poll() is None:
            await asyncio.sleep(poll_s)
        kill_leftovers(self.worker)
        return self.worker.proc.returncode

    async def signal(self, sig: int) -> None:
        """Forward a signal (SIGTERM, SIGINT...) to the child's process group."""
        if self.worker is not None and self.worker.proc.poll() is None:
            signal_group(self.worker, sig)


class ActorProc:
    """Stands in for the ``Popen`` the agent polls, for a worker living in a Ray actor.

    ``poll``/``wait``/``returncode``/``pid`` behave as Popen's; :func:`signal_group` and
    :func:`kill_leftovers` in ``launch.workers`` call the methods of the same names. An
    actor that dies (killed, crashed, node lost) took its child with it: its return code
    reads ``-SIGKILL``, so the exit record says ``killed by SIGKILL``.
    """

    def __init__(self, actor: Any, pid: int, poll_s: float) -> None:
        self.actor = actor
        self.pid = pid
        self.returncode: int | None = None
        self.lost: str | None = None
        """Why the actor itself died, when it did (else None)."""
        self._done = actor.wait.remote(poll_s)

    def poll(self) -> int | None:
        """The return code if the worker has exited, else None (never blocks)."""
        import ray

        if self.returncode is None and ray.wait([self._done], timeout=0)[0]:
            self._settle()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; raises ``subprocess.TimeoutExpired`` like Popen."""
        import ray

        if self.returncode is None:
            if not ray.wait([self._done], timeout=timeout)[0]:
                raise subprocess.TimeoutExpired(f"ray actor of pid {self.pid}", timeout or 0)
            self._settle()
        return self.returncode

    def _settle(self) -> None:
        import ray

        try:
            self.returncode = int(ray.get(self._done))
        except ray.exceptions.RayActorError as err:
            self.returncode = -int(signal.SIGKILL)
            self.lost = type(err).__name__
            log.warning("the actor of worker pid %d died: %s", self.pid,
                        str(err).splitlines()[0])

    def signal_group(self, sig: int) -> None:
        """SIGKILL kills the actor (and so its child); other signals reach the child."""
        import ray

        if sig == signal.SIGKILL:
            ray.kill(self.actor, no_restart=True)
        else:
            self.actor.signal.remote(int(sig))

    def kill_leftovers(self) -> None:
        """The worker has exited: end its actor too, which frees its bundle for a
        replacement (the actor already SIGKILLed the child's process group)."""
        import ray

        ray.kill(self.actor, no_restart=True)


class _Finished:
    """A ``Popen`` stand-in for a worker that never started (exit code 1)."""

    pid = -1
    returncode = 1

    def poll(self) -> int:
        return 1

    def wait(self, timeout: float | None = None) -> int:
        return 1

    def signal_group(self, sig: int) -> None:
        pass

    def kill_leftovers(self) -> None:
        pass


def never_started(rank: int) -> Worker:
    """A worker whose start failed: it reads as exited with code 1."""
    return Worker(rank, 0, _Finished())  # type: ignore[arg-type]

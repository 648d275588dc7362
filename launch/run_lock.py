"""One job per run directory: an exclusive lock file naming its owner.

``RUN_DIR/odyssey.lock`` holds ``{"host","pid","job_id","time"}`` of the launcher that owns
the directory. It is created with ``O_CREAT | O_EXCL``, so of two launchers starting at
once exactly one wins. A lock left by a launcher that died (same host, pid gone) is taken
over with a message; a live owner, or one on another host (whose liveness this host
cannot see), makes the second job stop with a :class:`RunDirLocked` naming the first.
A launcher that ends normally removes its lock. Multi-node jobs: node 0's launcher
holds it (the others may share the directory).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from odyssey import contract

log = logging.getLogger("launch")


class RunDirLocked(RuntimeError):
    """The run directory belongs to another job; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def describe(owner: dict[str, Any]) -> str:
    """``job 3f2a... (pid 1234 on host node0, since 12:00:01)``."""
    since = time.strftime("%H:%M:%S", time.localtime(owner.get("time", 0)))
    return (f"job {owner.get('job_id', '?')} (pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, since {since})")


class RunDirLock:
    """Held by the launcher for the life of the job: ``with RunDirLock(dir, job_id):``."""

    def __init__(self, run_dir: str | os.PathLike, job_id: str):
        self.path = os.path.join(os.fspath(run_dir), contract.RUN_LOCK_FILE)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
                      "time": time.time()}
        self._held = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirLocked` naming the job that has it."""
        for _ in range(3):  # a stale lock removed, or a racing owner's file half-written
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    time.sleep(0.1)  # its writer is between create and write
                    owner = self._read()
                if owner is not None and not self._stale(owner):
                    raise RunDirLocked(
                        f"run directory {os.path.dirname(self.path)} is in use by "
                        f"{describe(owner)}; wait for it, stop it, or pick another --run-dir"
                        + ("" if owner.get("host") == self.owner["host"] else
                           f" (if that job is dead, delete {self.path})")) from None
                log.warning("taking over the lock of %s: %s", os.path.dirname(self.path),
                            f"{describe(owner)} is no longer running" if owner
                            else "unreadable lock file")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self._held = True
            return
        raise RunDirLocked(f"cannot take the lock {self.path}: it keeps changing")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self._held and (self._read() or {}).get("pid") == self.owner["pid"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict[str, Any]) -> bool:
        """True when `owner` is a dead launcher of this host."""
        return owner.get("host") == self.owner["host"] and not _alive(int(owner.get("pid", 0)))

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

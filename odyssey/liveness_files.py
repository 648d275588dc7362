"""The "node" control plane's node-local files: heartbeats go up, notices come down.

A worker's heartbeat is a counter in a small file of the directory its launcher created
(``ODYSSEY_LIVENESS_DIR``), rewritten in place every heartbeat period: no store request.
The launcher reads its local workers' files each loop period and fences a worker whose
counter stops moving (launch/node_liveness.py). Going the other way, the launcher relays
each generation's notice from the store into one file per generation, which the
workers' watcher threads look for with a cheap open. File names: odyssey/contract.py.
Torch-free, so the launcher imports it without torch.
"""

from __future__ import annotations

import json
import os
import threading

from odyssey import contract


def _write_json_atomic(path: str, record: dict) -> None:
    """Readers see the whole file or none (write a temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


class BeatFile:
    """One worker's heartbeat counter (worker side)."""

    def __init__(self, directory: str, rank: int, heartbeat_timeout_s: float) -> None:
        self.path = os.path.join(directory, contract.liveness_beat_file(rank))
        # the info first: a launcher that sees the beat file can read the allowed stall
        _write_json_atomic(os.path.join(directory, contract.liveness_info_file(rank)),
                           {"rank": rank, "pid": os.getpid(),
                            "heartbeat_timeout_s": heartbeat_timeout_s})
        self._lock = threading.Lock()  # beats come from a thread; close must not race it
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                       0o600)
        self.count = 0
        self.beat()

    def beat(self) -> None:
        """Bump the counter (fixed width: an in-place rewrite, never a shorter file)."""
        with self._lock:
            if self._fd is None:
                return
            self.count += 1
            os.pwrite(self._fd, b"%20d\n" % self.count, 0)

    def close(self) -> None:
        """Stop beating on purpose: remove the file first, so the launcher stops watching
        this rank instead of taking the silence for a hang."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def read_beat(directory: str, rank: int) -> bytes | None:
    """The raw counter of `rank` (compare for change: a torn read only looks like a
    beat), or None when it is not beating (not started, or its monitor stopped)."""
    try:
        with open(os.path.join(directory, contract.liveness_beat_file(rank)), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_info(directory: str, rank: int) -> dict | None:
    """What `rank` wrote before its first beat ({"rank","pid","heartbeat_timeout_s"})."""
    return _read_json(os.path.join(directory, contract.liveness_info_file(rank)))


def beating(directory: str, ranks: list[int]) -> list[int]:
    """Those of `ranks` with a heartbeat file in `directory` (one stat each)."""
    return [r for r in ranks
            if os.path.exists(os.path.join(directory, contract.liveness_beat_file(r)))]


def write_notice(directory: str, record: dict) -> None:
    """Relay one generation's notice (launcher side; the record carries its "gen")."""
    _write_json_atomic(os.path.join(directory, contract.liveness_notice_file(record["gen"])),
                       record)


def read_notice(directory: str, gen: int) -> dict | None:
    """Generation `gen`'s notice if the launcher relayed it (one failed open otherwise)."""
    return _read_json(os.path.join(directory, contract.liveness_notice_file(gen)))

"""The launcher <-> worker contract: environment variable names and store keys.

Everything a worker may rely on from ``odyssey run`` is named here, so the two sides
cannot drift apart silently. Imports flow ``launch -> odyssey``, so keys both sides use
are defined in ``odyssey.keys`` and re-exported here; ``docs/launcher.md`` is the
reference both follow.

All store keys live in the launcher-hosted TCPStore at
``ODYSSEY_STORE_ADDR:ODYSSEY_STORE_PORT``. JSON values are UTF-8 bytes.
"""

from __future__ import annotations

import json
import signal as _signal
from dataclasses import asdict, dataclass

# Store keys shared with the worker side are defined once, in odyssey.keys (imports flow
# launch -> odyssey): EXITS_COUNT is bumped once per recorded exit, after the record is
# set; JOB_STATUS is set by the training leader at the end (JOB_DONE means success).
from odyssey.keys import (  # noqa: F401 - re-exported for the launcher
    EXITS_COUNT,
    INJECT_COUNT,
    JOB_DONE,
    JOB_STATUS,
    exit_key,
    fence_key,
    fenced_key,
    inject_key,
)

# --- environment: Odyssey additions (torchrun's own names are set in launch.workers) ---
ENV_STORE_ADDR = "ODYSSEY_STORE_ADDR"
ENV_STORE_PORT = "ODYSSEY_STORE_PORT"
ENV_RUN_DIR = "ODYSSEY_RUN_DIR"
ENV_LAUNCHER = "ODYSSEY_LAUNCHER"

SPAWN_COUNT = "odyssey/spawn/count"
"""Counter of replacement-worker requests; request i is ``odyssey/spawn/{i}``."""
NEXT_RANK = "odyssey/next_rank"
"""Counter of replacement workers started; the i-th gets global rank world_size + i."""
ENV_JOIN = "ODYSSEY_JOIN"


def spawn_key(index: int) -> str:
    """JSON ``{"node", "reason"}``: start one replacement worker on that node."""
    return f"odyssey/spawn/{index}"


def worker_key(rank: int) -> str:
    """Key of the JSON spawn record ``{"rank","pid","node","host"}`` (an Odyssey addition)."""
    return f"odyssey/workers/{rank}"


def node_done_key(node: int) -> str:
    """Set by a node's launcher once all its workers have exited (multi-node bookkeeping)."""
    return f"odyssey/nodes/{node}/done"


def node_beat_key(node: int) -> str:
    """Counter a node's launcher bumps every fraction of a second (liveness, multi-node)."""
    return f"odyssey/nodes/{node}/beat"


def node_lost_key(node: int) -> str:
    """JSON ``{"node","by","time","last_beat","silent_s"}``: set once (compare-and-set) by
    the watcher that declared ``node`` lost (launch/node_watch.py)."""
    return f"odyssey/nodes/{node}/lost"


NODES_CONFIG = "odyssey/nodes/config"
"""JSON ``{"nnodes","world_size","node_timeout_s"}`` set by every multi-node launcher, so
``odyssey store`` knows which heartbeats to watch."""


@dataclass(frozen=True)
class ExitRecord:
    """What the launcher records when a worker process ends.

    ``exitcode`` follows :class:`subprocess.Popen`: the exit status, or ``-N`` when the
    process was killed by signal ``N`` (then ``signal`` holds its name, e.g. ``SIGKILL``).
    A rank whose whole node was lost gets ``exitcode`` 255, no ``signal``, and
    ``node_lost`` set to the node (written by the watcher that declared it lost).
    """

    rank: int
    pid: int
    exitcode: int
    signal: str | None
    time: float
    node_lost: int | None = None

    @classmethod
    def from_returncode(cls, rank: int, pid: int, returncode: int, when: float) -> ExitRecord:
        """Build a record from a ``Popen.returncode``."""
        sig = signal_name(-returncode) if returncode < 0 else None
        return cls(rank, pid, returncode, sig, when)

    def to_json(self) -> str:
        """Serialise as the JSON object stored under :func:`exit_key`."""
        return json.dumps(asdict(self))

    def describe(self) -> str:
        """Human-readable outcome, e.g. ``exit 0`` or ``killed by SIGKILL``."""
        if self.node_lost is not None:
            return f"lost with node {self.node_lost}"
        return f"killed by {self.signal}" if self.signal else f"exit {self.exitcode}"


def signal_name(signum: int) -> str:
    """``9 -> "SIGKILL"``; unknown numbers become ``"SIG<n>"``."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"

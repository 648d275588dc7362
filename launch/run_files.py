"""The run directory: choosing and creating it, and the launcher file each launcher keeps.

``<run dir>/launcher-node<N>.json`` says how to reach a running job's store, which pids
its workers have, and at the end how each exited; tools (``odyssey inject``, tests,
fault injectors) find a job through it. The job token lives beside it
(:mod:`odyssey.control`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from odyssey import contract


def default_run_dir(now: float | None = None) -> str:
    """``runs/<YYYYmmdd-HHMMSS>`` under the current directory, suffixed if taken."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.localtime(now)))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def make_run_dir(path: str | None) -> str:
    """Create ``path`` (default: :func:`default_run_dir`); returns it absolute."""
    path = os.path.abspath(path or default_run_dir())
    os.makedirs(path, exist_ok=True)
    return path


def write_launcher_file(run_dir: str, node_rank: int, info: dict[str, Any]) -> str:
    """Write ``info`` as ``<run_dir>/launcher-node<N>.json``, atomically; returns the path."""
    path = os.path.join(run_dir, contract.launcher_file(node_rank))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)  # atomic: readers never see half a file
    return path


def read_launcher_file(run_dir: str, node_rank: int = 0) -> dict[str, Any] | None:
    """What :func:`write_launcher_file` wrote for that node, or None if it has not."""
    path = os.path.join(run_dir, contract.launcher_file(node_rank))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)

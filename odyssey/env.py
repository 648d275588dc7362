"""Who this worker is and where the job's store lives, read from the environment.

Under `odyssey run` the launcher hosts the store (ODYSSEY_STORE_ADDR/PORT) so it outlives
any worker, and says which address this worker binds (ODYSSEY_HOST: its node's) and the
job token (ODYSSEY_TOKEN). Under plain `torchrun` we use torchrun's store, under a prefix
per restart attempt so a restarted group never reads keys of the previous attempt, and
bind the address that routes to MASTER_ADDR (127.0.0.1 on a single node).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract
from odyssey.netaddr import is_loopback, route_addr


@dataclass
class WorkerInfo:
    """Identity of one worker and its handle on the job's store."""

    rank: int
    """Stable worker id (the global rank it was launched with)."""
    world_size: int
    """Workers launched."""
    store: dist.Store
    """Client of the job's key-value store."""
    local_rank: int = 0
    """Rank on its node."""
    attempt: int = 0
    """torchrun restart attempt (always 0 under `odyssey run`)."""
    launcher: str = "odyssey"
    """'odyssey' (survivors kept) or 'torchrun' (group restarts on failure)."""
    run_dir: str | None = None
    """Run directory handed down by the launcher, if any."""
    host: str = "127.0.0.1"
    """Address for this worker's communication transport."""
    store_factory: Callable[[], dist.Store] | None = None
    """Opens another client of the same store (for the heartbeat thread)."""
    joining: bool = False
    """A replacement worker joining a running job (ODYSSEY_JOIN=1)."""
    token: str | None = None
    """The job token control commands are signed with (None outside `odyssey run`)."""
    local_world_size: int = 0
    """Workers per node (LOCAL_WORLD_SIZE; 0: unknown). Ranks r and r' share a node when
    r // n == r' // n: peer checkpoint copies go to another node."""


def store_client(addr: str, port: int, timeout_s: float = 120.0) -> dist.TCPStore:
    return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                         use_libuv=True)


def worker_from_env(timeout_s: float = 120.0) -> WorkerInfo:
    """Build `WorkerInfo` from the variables `odyssey run` or `torchrun` exported."""
    env = os.environ
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise RuntimeError(
            f"environment variables {missing} are not set: start this script with "
            "`odyssey run --nproc-per-node N script.py` or `torchrun ...`"
        )
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if contract.ENV_STORE_ADDR in env:
        addr, port = env[contract.ENV_STORE_ADDR], int(env[contract.ENV_STORE_PORT])
        return WorkerInfo(rank, world, store_client(addr, port, timeout_s),
                          int(env.get("LOCAL_RANK", 0)), 0, "odyssey",
                          env.get(contract.ENV_RUN_DIR), env[contract.ENV_HOST],
                          lambda: store_client(addr, port, timeout_s),
                          env.get(contract.ENV_JOIN) == "1", env.get(contract.ENV_TOKEN),
                          int(env.get("LOCAL_WORLD_SIZE", 0)))
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    host = "127.0.0.1" if is_loopback(addr) else (route_addr(addr, port) or "127.0.0.1")

    def open_store() -> dist.Store:
        return dist.PrefixStore(f"attempt{attempt}", store_client(addr, port, timeout_s))

    return WorkerInfo(rank, world, open_store(), int(env.get("LOCAL_RANK", 0)), attempt,
                      "torchrun", env.get(contract.ENV_RUN_DIR), host, open_store,
                      local_world_size=int(env.get("LOCAL_WORLD_SIZE", 0)))

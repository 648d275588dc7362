"""A stand-in for a running job, for the control CLIs' fast tests: a store hosted in the
test process, the launcher file and the job token in a run directory, and the ranks'
spawn records, as `odyssey run` leaves them (no worker is started)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from torch.distributed import TCPStore

from launch.run_files import write_launcher_file
from odyssey import contract
from odyssey.control import new_token, token_check, write_token


@contextmanager
def live_store(run_dir: Path, world_size: int = 2) -> Iterator[tuple[TCPStore, str]]:
    """(the job's store, its token) while the block runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=10), use_libuv=True)
    token = new_token()
    write_token(str(run_dir), token)
    store.set(contract.TOKEN_CHECK, token_check(token))
    for r in range(world_size):
        store.set(contract.worker_key(r), json.dumps({"rank": r, "pid": 0, "node": 0,
                                                      "host": "127.0.0.1"}))
    write_launcher_file(str(run_dir), 0, {"store_addr": "127.0.0.1", "store_port": store.port,
                                          "world_size": world_size, "exit_code": None})
    try:
        yield store, token
    finally:
        del store

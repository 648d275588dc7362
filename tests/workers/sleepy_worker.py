"""Tiny worker for tests/launch/test_launcher.py, run under ``odyssey run``.

It saves the launcher contract variables to ``$ODYSSEY_RUN_DIR/env-<rank>.json``, sets
``test/ready/<rank>`` to its pid, then (with ``--wait``) bumps ``test/beat/<rank>`` every
50 ms until ``test/finish`` appears. It never outlives ``--deadline`` seconds.

Those ``test/*`` keys go through a channel: ``--channel store`` (default) uses the
launcher-hosted TCPStore named in the environment, as real workers do. ``--channel file``
keeps them as files in the run dir and never imports torch, which saves ~2.7 CPU-seconds
per worker; tests whose point is the launcher's own behaviour use it to stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from datetime import timedelta


def _load_contract():
    """odyssey/contract.py by path: it is torch-free, the odyssey package's __init__ not."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "odyssey", "contract.py")
    spec = importlib.util.spec_from_file_location("_odyssey_contract", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


contract = _load_contract()

CONTRACT_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
    "OMP_NUM_THREADS", contract.ENV_STORE_ADDR, contract.ENV_STORE_PORT,
    contract.ENV_RUN_DIR, contract.ENV_LAUNCHER, contract.ENV_HOST, contract.ENV_TOKEN,
    contract.ENV_GLOO_IFNAME, "TORCH_CPP_LOG_LEVEL",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wait", action="store_true", help="run until test/finish is set")
    parser.add_argument("--exit-code", action="append", default=[], metavar="RANK=CODE",
                        help="exit with CODE on RANK (default 0)")
    parser.add_argument("--done", action="store_true",
                        help="rank 0 sets odyssey/job/status=done before exiting")
    parser.add_argument("--ignore-sigterm", type=int, default=None, metavar="RANK",
                        help="this rank ignores SIGTERM")
    parser.add_argument("--gloo", action="store_true",
                        help="init a gloo process group via env:// and all-reduce once")
    parser.add_argument("--channel", choices=("store", "file"), default="store")
    parser.add_argument("--deadline", type=float, default=45.0)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    if args.ignore_sigterm == rank:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    run_dir = os.environ[contract.ENV_RUN_DIR]
    chan = FileChannel(run_dir) if args.channel == "file" else StoreChannel()
    if args.gloo:
        _gloo_all_reduce()

    env = {name: os.environ[name] for name in CONTRACT_VARS if name in os.environ}
    with open(os.path.join(run_dir, f"env-{rank}.json"), "w") as f:
        json.dump(env, f)
    chan.set(f"test/ready/{rank}", str(os.getpid()))

    if args.wait:
        end = time.monotonic() + args.deadline
        while not chan.check("test/finish"):
            chan.add(f"test/beat/{rank}", 1)
            if time.monotonic() > end:
                return 99
            time.sleep(0.05)
    if args.done and rank == 0:
        chan.set(contract.JOB_STATUS, contract.JOB_DONE)
    codes = {int(r): int(c) for r, c in (item.split("=") for item in args.exit_code)}
    return codes.get(rank, 0)


class StoreChannel:
    """``test/*`` keys in the launcher-hosted store, reached through the env contract."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        self.store = dist.TCPStore(
            os.environ[contract.ENV_STORE_ADDR], int(os.environ[contract.ENV_STORE_PORT]),
            is_master=False, timeout=timedelta(seconds=30))

    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def check(self, key: str) -> bool:
        return self.store.check([key])

    def add(self, key: str, amount: int) -> int:
        return self.store.add(key, amount)


class FileChannel:
    """``test/*`` keys as files ``<dir>/test_ready_0`` ...; each key has a single writer."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key.replace("/", "_"))

    def set(self, key: str, value: str) -> None:
        if not key.startswith("test/"):
            raise ValueError("the file channel only carries test/* keys, not the "
                             "launcher's store")
        tmp = f"{self._path(key)}.tmp"
        with open(tmp, "w") as f:
            f.write(value)
        os.replace(tmp, self._path(key))  # readers never see a half-written value

    def check(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def add(self, key: str, amount: int) -> int:
        try:
            with open(self._path(key)) as f:
                value = int(f.read() or 0) + amount
        except FileNotFoundError:
            value = amount
        self.set(key, str(value))
        return value


def _gloo_all_reduce() -> None:
    """Plain env:// init must work: MASTER_ADDR/PORT name the launcher's store."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    t = torch.ones(1)
    dist.all_reduce(t)
    assert int(t.item()) == dist.get_world_size()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

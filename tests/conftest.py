import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def tcp_store():
    """A TCPStore server on loopback (any free port) for tests that need a job's store."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=20))
    yield master
    del master


def store_client(master, timeout_s: float = 20.0):
    """Another client of the test's store (as a rank or a thread has its own)."""
    return dist.TCPStore("127.0.0.1", master.port, is_master=False,
                         timeout=timedelta(seconds=timeout_s))

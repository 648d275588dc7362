"""The launcher-hosted TCPStore: creating the server, connecting clients, surviving errors.

The store lives in the launcher (node 0's launcher for multi-node jobs), never in a
worker, so any worker may die without taking the job's shared state with it.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from odyssey import contract
from odyssey.netaddr import is_loopback

log = logging.getLogger("launch")

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class HostedStore:
    """A TCPStore server (it owns its listening socket)."""

    store: Any  # torch.distributed.TCPStore; typed loosely so this module imports lazily
    addr: str
    port: int

    def close(self) -> None:
        """Drop the server (and its socket); clients see connection errors afterwards."""
        self.store = None


def host_store(
    bind_addr: str, port: int = 0, advertise_addr: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> HostedStore:
    """Start a TCPStore server listening on ``bind_addr:port`` (0 = any free port).

    We bind the socket ourselves and hand it over with ``master_listen_fd``: TCPStore on
    its own listens on every interface, and asking the OS for port 0 here avoids the
    pick-a-free-port-then-bind race.
    """
    from torch.distributed import TCPStore

    family = socket.AF_INET6 if _is_ipv6(bind_addr) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_addr, port))
        sock.listen(1024)
        bound_port = sock.getsockname()[1]
        addr = advertise_addr or bind_addr
        store = TCPStore(
            addr, bound_port, is_master=True, master_listen_fd=sock.fileno(),
            wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the server closes the fd when it is destroyed; don't close it twice
    return HostedStore(store=store, addr=addr, port=bound_port)


def connect_store(addr: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Connect a TCPStore client (retries until ``timeout_s`` while the server comes up)."""
    from torch.distributed import TCPStore

    return TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def use_external_store(endpoint: str) -> HostedStore:
    """A client of the store ``odyssey store`` serves at ``endpoint`` (--store-endpoint).

    Wrapped as a HostedStore so both paths look alike; closing it drops only the client.
    A store that already saw a job end is refused: its keys would mislead this one.
    """
    addr, _, port = endpoint.rpartition(":")
    store = connect_store(addr, int(port))
    if store.check([contract.JOB_STATUS]):
        raise RuntimeError("it already holds a finished job's keys; start a fresh "
                           "`odyssey store` for each job")
    return HostedStore(store=store, addr=addr, port=int(port))


def _is_ipv6(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.strip("[]")).version == 6
    except ValueError:
        return False


def bind_addr_for(advertise_addr: str) -> str:
    """Where node 0 should listen so other nodes can reach ``advertise_addr``."""
    if is_loopback(advertise_addr):
        return "127.0.0.1" if advertise_addr == "localhost" else advertise_addr.strip("[]")
    try:
        return str(ipaddress.ip_address(advertise_addr.strip("[]")))
    except ValueError:
        # A host name may resolve differently here than elsewhere: listen everywhere.
        return "0.0.0.0"


class SafeStore:
    """Store access for the supervision loop that never raises.

    On a remote node the store host (node 0) may vanish. Supervision of local workers
    (reaping, summaries, no orphans) must carry on, so store errors are logged once and
    turn every later call into a no-op returning the given default.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.lost = False

    def _call(self, default: Any, method: str, *args: Any) -> Any:
        if self.lost:
            return default
        try:
            return getattr(self._store, method)(*args)
        except Exception as err:  # any store failure means the same here
            self.lost = True
            log.error("lost the Odyssey store (%s: %s); supervising local workers only",
                      type(err).__name__, err)
            return default

    def clone(self) -> Any:
        """Another client of the same store, for a thread of its own (None if lost)."""
        return self._call(None, "clone")

    def check(self, key: str) -> bool:
        """True if ``key`` exists."""
        return bool(self._call(False, "check", [key]))

    def get_text(self, key: str) -> str | None:
        """Value of an existing ``key`` as text (call :meth:`check` first: get blocks)."""
        raw = self._call(None, "get", key)
        return None if raw is None else raw.decode("utf-8", errors="replace")

    def set(self, key: str, value: str) -> None:
        """Set ``key``."""
        self._call(None, "set", key, value)

    def compare_set(self, key: str, expected: str, desired: str) -> str | None:
        """Set ``key`` to ``desired`` if it holds ``expected`` ("" = absent); returns the
        value that stands (None if the store is lost)."""
        raw = self._call(None, "compare_set", key, expected, desired)
        return None if raw is None else raw.decode("utf-8", errors="replace")

    def add(self, key: str, amount: int) -> int:
        """Atomically add to a counter key; returns the new value (0 if the store is lost)."""
        return int(self._call(0, "add", key, amount))

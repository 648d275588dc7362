"""Multi-node start-up: agree on node ranks with torch's rendezvous, then find node 0's store.

torch's rendezvous handlers (``c10d``, ``static``, ``etcd``...) do the hard part: they
admit ``--nnodes`` launchers and give each a node rank. We then use the rendezvous store
once, to share each node's worker count, the address of the Odyssey store that node 0
hosts and the job token; after that the rendezvous is not needed again (Odyssey never
re-rendezvous to restart workers).

Every node's address (what its workers bind, and node 0's store) is chosen before the
rendezvous by :func:`node_address`. torch decides whether this launcher hosts the c10d
rendezvous store by comparing host names, which fails inside containers and network
namespaces (every "machine" has the same name); :func:`rendezvous_configs` also
recognises the endpoint as one of this node's own interface addresses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launch.options import LaunchOptions
from odyssey import contract, netaddr
from odyssey.control import TokenError, new_token

log = logging.getLogger("launch")

C10D_DEFAULT_PORT = 29400
"""torch's c10d rendezvous port when ``--rdzv-endpoint`` names none."""


@dataclass
class NodeRendezvous:
    """This node's place in a multi-node job."""

    node_rank: int
    nnodes: int
    nprocs: list[int]
    """Workers per node, indexed by node rank (nodes may differ)."""
    store_addr: str
    store_port: int
    run_dir: str
    token: str
    """The job token every launcher of the job shares."""
    handler: Any  # torch RendezvousHandler, kept to shut it down at the end

    @property
    def rank_offset(self) -> int:
        """Global rank of this node's first worker."""
        return sum(self.nprocs[: self.node_rank])

    @property
    def world_size(self) -> int:
        """Total number of workers in the job."""
        return sum(self.nprocs)

    def shutdown(self) -> None:
        """Close the rendezvous; errors (e.g. its store host already gone) are only logged."""
        try:
            self.handler.shutdown()
        except Exception as err:  # best effort at exit
            log.debug("rendezvous shutdown: %s", err)


def node_address(opts: LaunchOptions) -> str:
    """This node's address: --local-addr, else the route to the rendezvous endpoint (or
    the store run apart), else the FQDN (:func:`odyssey.netaddr.node_address`)."""
    peer = opts.rdzv_endpoint or opts.store_endpoint
    host = netaddr.split_endpoint(peer)[0] if peer else None
    addr = netaddr.node_address(opts.local_addr, host)
    if netaddr.is_loopback(addr) and not (host and netaddr.is_loopback(host)):
        log.warning("this node's address is %s, a loopback address (the endpoint's name "
                    "resolves to it here?): other nodes cannot reach it; give --local-addr",
                    addr)
    return addr


def rendezvous_configs(opts: LaunchOptions) -> dict[str, Any]:
    """``--rdzv-conf`` plus ``is_host=True`` when this node must host the c10d store.

    That is when the endpoint is one of our own (non-loopback) interface addresses and
    nobody listens there yet; torch handles loopback and matching host names itself.
    """
    configs = dict(opts.rdzv_configs)
    if opts.rdzv_backend != "c10d" or "is_host" in configs or not opts.rdzv_endpoint:
        return configs
    host, port = netaddr.split_endpoint(opts.rdzv_endpoint, C10D_DEFAULT_PORT)
    if (not netaddr.is_loopback(host) and netaddr.is_local_address(host)
            and netaddr.port_is_free(host, port)):
        log.info("rendezvous endpoint %s is this node's own address: hosting it",
                 opts.rdzv_endpoint)
        configs["is_host"] = True
    return configs


def join(
    opts: LaunchOptions, node_addr: str, start_store: Callable[[], tuple[str, int]],
    run_dir: str, own_token: str | None,
) -> NodeRendezvous:
    """Rendezvous with the other launchers and learn where the Odyssey store is.

    ``start_store() -> (addr, port)`` runs on node 0 only, after node ranks are known;
    ``run_dir`` is node 0's choice and every node adopts it. The job token is
    ``own_token`` (--token-file) where given, else the one node 0 creates and passes on.
    """
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    params = RendezvousParameters(
        backend=opts.rdzv_backend, endpoint=opts.rdzv_endpoint, run_id=opts.run_id,
        min_nodes=opts.min_nodes, max_nodes=opts.max_nodes, local_addr=node_addr,
        **rendezvous_configs(opts),
    )
    handler = get_rendezvous_handler(params)
    nodes = opts.min_nodes if opts.min_nodes == opts.max_nodes else \
        f"{opts.min_nodes}..{opts.max_nodes}"
    log.info("rendezvous %s at %s (run id %s): waiting for %s node(s); this node is %s",
             opts.rdzv_backend, opts.rdzv_endpoint, opts.run_id, nodes, node_addr)
    info = handler.next_rendezvous()
    try:
        node_rank, nnodes, rstore = info.rank, info.world_size, info.store
        rstore.set(contract.launch_nproc_key(node_rank), str(opts.nproc))
        if node_rank == 0:
            addr, port = start_store()
            rstore.set(contract.LAUNCH_STORE, f"{addr}:{port}")
            rstore.set(contract.LAUNCH_RUN_DIR, run_dir)
            # "" says: node 0 read its token from a file; every node needs that file.
            token = own_token or new_token()
            rstore.set(contract.LAUNCH_TOKEN, "" if own_token else token)
        nprocs = [int(rstore.get(contract.launch_nproc_key(n))) for n in range(nnodes)]
        store_addr, _, port_text = rstore.get(contract.LAUNCH_STORE).decode().rpartition(":")
        shared_run_dir = rstore.get(contract.LAUNCH_RUN_DIR).decode()
        if node_rank != 0:
            token = _shared_token(rstore.get(contract.LAUNCH_TOKEN).decode(), own_token)
    except BaseException:
        _shutdown_quietly(handler)
        raise
    return NodeRendezvous(node_rank, nnodes, nprocs, store_addr, int(port_text),
                          shared_run_dir, token, handler)


def _shared_token(published: str, own_token: str | None) -> str:
    """A non-zero node's token: its --token-file's, else the one node 0 published."""
    if own_token is not None:
        if published and published != own_token:
            raise TokenError("--token-file: node 0 runs with another token (it was given "
                             "no --token-file); give every launcher the same file, or none")
        return own_token
    if not published:
        raise TokenError("node 0 was given --token-file: give every launcher the same file")
    return published


def _shutdown_quietly(handler: Any) -> None:
    try:
        handler.shutdown()
    except Exception:  # already failing: keep the first error
        pass

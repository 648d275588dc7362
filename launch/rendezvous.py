"""Multi-node start-up: agree on node ranks with torch's rendezvous, then find node 0's store.

torch's rendezvous handlers (``c10d``, ``static``, ``etcd``...) do the hard part: they
admit ``--nnodes`` launchers and give each a node rank. We then use the rendezvous store
once, to share each node's worker count and the address of the Odyssey store that
node 0 hosts; after that the rendezvous is not needed again (Odyssey never re-rendezvous
to restart workers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from odyssey import contract

log = logging.getLogger("launch")



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


def join(
    backend: str, endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
    local_addr: str | None, rdzv_configs: dict[str, Any], nproc: int,
    start_store: Callable[[str], tuple[str, int]], run_dir: str,
) -> NodeRendezvous:
    """Rendezvous with the other launchers and learn where the Odyssey store is.

    ``start_store(advertise_addr) -> (addr, port)`` runs on node 0 only, after node ranks
    are known; ``run_dir`` is node 0's choice and every node adopts it.
    """
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    params = RendezvousParameters(
        backend=backend, endpoint=endpoint, run_id=run_id, min_nodes=min_nodes,
        max_nodes=max_nodes, local_addr=local_addr, **rdzv_configs,
    )
    handler = get_rendezvous_handler(params)
    log.info("rendezvous %s at %s (run id %s): waiting for %s node(s)", backend, endpoint,
             run_id, min_nodes if min_nodes == max_nodes else f"{min_nodes}..{max_nodes}")
    info = handler.next_rendezvous()
    try:
        node_rank, nnodes, rstore = info.rank, info.world_size, info.store
        rstore.set(contract.launch_nproc_key(node_rank), str(nproc))
        if node_rank == 0:
            # Node 0's address as torch's bootstrap agreed it (--local-addr or its FQDN).
            addr, port = start_store(local_addr or info.bootstrap_store_info.master_addr)
            rstore.set(contract.LAUNCH_STORE, f"{addr}:{port}")
            rstore.set(contract.LAUNCH_RUN_DIR, run_dir)
        nprocs = [int(rstore.get(contract.launch_nproc_key(n))) for n in range(nnodes)]
        store_addr, _, port_text = rstore.get(contract.LAUNCH_STORE).decode().rpartition(":")
        shared_run_dir = rstore.get(contract.LAUNCH_RUN_DIR).decode()
    except BaseException:
        _shutdown_quietly(handler)
        raise
    return NodeRendezvous(node_rank, nnodes, nprocs, store_addr, int(port_text),
                          shared_run_dir, handler)


def _shutdown_quietly(handler: Any) -> None:
    try:
        handler.shutdown()
    except Exception:  # already failing: keep the first error
        pass

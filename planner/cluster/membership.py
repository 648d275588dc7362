"""The simulated cluster: GPU slots, failure domains, and which ranks are up.

`num_nodes x gpus_per_node` GPU slots are grouped into failure domains of
`trace_node_gpus`; each trace node takes one domain when it arrives (or waits as a
spare when every domain is taken) and its ranks are the domain's slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cluster.traces import TraceEvent
from planner.plan import PlanError


@dataclass(frozen=True)
class ClusterConfig:
    """The machines and how trace nodes map onto them."""

    num_nodes: int = 4
    """Physical nodes (link classes: ranks on one node use 'intra')."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    trace_node_gpus: int = 1
    """GPUs one trace node stands for (its failure domain); must divide gpus_per_node."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def check(self) -> ClusterConfig:
        if self.num_nodes < 1 or self.gpus_per_node < 1 or self.trace_node_gpus < 1:
            raise PlanError("num_nodes, gpus_per_node and trace_node_gpus must be >= 1")
        if self.gpus_per_node % self.trace_node_gpus:
            raise PlanError(f"trace_node_gpus={self.trace_node_gpus} must divide "
                            f"gpus_per_node={self.gpus_per_node}")
        return self



class Membership:
    """Trace nodes -> failure-domain slots -> ranks."""

    def __init__(self, cluster: ClusterConfig):
        self.c = cluster.check()
        self.slots: dict[int, str | None] = {
            i: None for i in range(cluster.world_size // cluster.trace_node_gpus)}
        self.spares: list[str] = []

    def apply(self, ev: TraceEvent) -> None:
        if ev.kind == "add":
            if ev.node in self.slots.values() or ev.node in self.spares:
                return
            free = [s for s, n in self.slots.items() if n is None]
            if free:
                self.slots[free[0]] = ev.node
            else:
                self.spares.append(ev.node)
        elif ev.kind == "remove":
            if ev.node in self.spares:
                self.spares.remove(ev.node)
            for s, n in self.slots.items():
                if n == ev.node:
                    self.slots[s] = self.spares.pop(0) if self.spares else None

    def ranks_of_node(self, node: str) -> list[int]:
        g = self.c.trace_node_gpus
        return [r for s, n in self.slots.items() if n == node for r in range(s * g, (s + 1) * g)]

    def members(self) -> list[int]:
        g = self.c.trace_node_gpus
        return [r for s, n in sorted(self.slots.items()) if n is not None
                for r in range(s * g, (s + 1) * g)]

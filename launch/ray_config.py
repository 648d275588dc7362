"""Where and how ``odyssey run --backend ray`` places its workers (no ray import here)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray placement-group strategies ``--ray-strategy`` accepts."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how ``--backend ray`` places the workers."""

    address: str | None = None
    """Cluster to join (``auto``: the one ``ray start`` runs on this machine, or
    ``ray://host:10001``); None starts a private local instance for this job."""
    cpus_per_worker: float = 1.0
    """CPUs in each worker's bundle (and reserved by its actor)."""
    gpus_per_worker: float = 0.0
    """GPUs in each worker's bundle; Ray sets the actor's CUDA_VISIBLE_DEVICES to them."""
    strategy: str = "PACK"
    """Placement-group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    temp_dir: str | None = None
    """Local instance only: Ray's session directory (default: Ray's, /tmp/ray)."""
    start_timeout_s: float = 120.0
    """How long the placement group and the actors may take to start."""

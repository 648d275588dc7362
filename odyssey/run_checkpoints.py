"""One worker's part in the job's checkpoints: where they live, what it writes at each
checkpoint (the layers it is the first holder of, the peer copies it sends and keeps), and
which checkpoint the job resumes from. The files and their rules: odyssey/checkpoint.py
and docs/checkpoints.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from odyssey import checkpoint as ckpt
from odyssey import contract
from odyssey.checkpoint_share import gather
from odyssey.env import WorkerInfo
from odyssey.job_config import CheckpointConfig
from planner.plan import Plan

Skipped = list[tuple[int, list[str]]]
"""Newer checkpoints passed over: (step, what is wrong with it)."""


class RunCheckpoints:
    """This rank's checkpoint duties in one run."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, worker: WorkerInfo,
                 num_layers: int, say: Callable[[str], None]):
        self.cfg = cfg
        self.worker = worker
        self.num_layers = num_layers
        self.dir = Path(cfg.dir) if cfg.dir else run_dir / contract.CHECKPOINT_DIR
        """The checkpoint root (RUN_DIR/checkpoints unless --checkpoint.dir)."""
        self.copies_dir = (Path(cfg.peer_dir) / contract.peer_checkpoint_dir(worker.rank)
                           if cfg.peer_dir else ckpt.peer_root(self.dir, worker.rank))
        """Where this rank keeps the peer copies it receives."""
        self.writer = ckpt.Checkpointer(
            self.dir, worker.store, worker.rank, keep=cfg.keep, timeout_s=cfg.timeout_s,
            say=say, store_factory=worker.store_factory, copies_dir=self.copies_dir)

    def find(self, plan: Plan) -> tuple[ckpt.Verified | None, Skipped]:
        """The checkpoint to resume under `plan` (every rank the same) and the newer ones
        skipped. Several ranks: collective, since the files may be spread over several
        nodes' disks (they agree, then each fetches what its stage lacks)."""
        if self.worker.world_size == 1:
            return ckpt.find_latest(self.dir, self.num_layers)
        needs = {r: list(plan.stage(r).layers) for r in plan.ranks}
        return gather(self.worker.store, self.worker.attempt, self.worker.rank, needs,
                      self.dir, self.num_layers, [self.copies_dir], self.cfg.timeout_s)

    def save(self, step: int, generation: int, plan: Plan, members: list[int],
             layer_state: Callable[[int], dict], meta: dict | None) -> None:
        """Checkpoint `step` under `plan`: this rank's layers (`layer_state(i)`), its peer
        copies; `meta` given by the leader only (it completes the checkpoint)."""
        me = self.worker.rank
        writer = {i: plan.holders(i)[0] for i in range(self.num_layers)}
        peers = {}
        if self.cfg.peer_copy:
            for i, w in writer.items():
                p = ckpt.peer_for(plan.holders(i), w, members, self.worker.local_world_size)
                if p is not None:
                    peers[i] = p
        if meta is not None:
            meta = {**meta, "num_layers": self.num_layers, "peer_copies": peers}
        held = [i for i, w in writer.items() if w == me]
        self.writer.save(step, generation, {i: layer_state(i) for i in held},
                         writers=sorted(set(writer.values())), meta=meta,
                         peers={i: peers[i] for i in held if i in peers},
                         receive=[i for i, p in peers.items() if p == me])

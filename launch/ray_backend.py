"""``odyssey run --backend ray``: the same job as Ray actors in a placement group.

One actor per worker slot (one placement-group bundle each) starts the training script as
its child process, with the environment ``odyssey run`` gives its workers, so a script
cannot tell which launcher started it. The driver hosts the store (or connects to one run
apart with ``odyssey store``) and runs the same supervision loop as the torchrun path
(:func:`launch.supervise.supervise`, with :class:`RayJob` as its backend). An actor that
dies -- ``ray.kill``, its process SIGKILLed, its node lost -- becomes an exit record of
its rank, just like a worker process the torchrun path reaps, so survivors recover the
same way. Each worker binds and advertises its actor's node IP. ``import ray`` happens
only on this path (in :func:`run_ray` and the methods it drives). See ``docs/ray.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from launch.options import LaunchOptions
from launch.ray_actor import ActorProc, WorkerHost, never_started
from launch.ray_config import RayConfig
from launch.run_files import make_run_dir
from launch.run_lock import RunDirLock
from launch.store import SafeStore, host_store, use_external_store
from launch.supervise import supervise
from launch.workers import JobLayout, Worker
from odyssey import contract
from odyssey.control import new_token, read_token, write_token

log = logging.getLogger("launch")


@dataclass
class Slot:
    """One placement-group bundle and what runs in it."""

    bundle: int
    rank: int
    node: int
    ip: str
    actor_pid: int


class RayJob:
    """Placement group and actors of one job on a Ray cluster: a supervision backend."""

    def __init__(self, ray: Any, opts: LaunchOptions, layout: JobLayout) -> None:
        self.ray = ray
        self.opts = opts
        self.cfg: RayConfig = opts.ray
        self.layout = layout
        """The driver's view: every worker is its own; no node heartbeats."""
        self.pg: Any = None
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, Worker] = {}
        self.nodes: list[str] = []  # node ids in order of first appearance
        self.cwd = os.getcwd()
        self._remote_cls = ray.remote(WorkerHost)

    # -- placement --------------------------------------------------------------------
    def bundle(self) -> dict[str, float]:
        """Resources of one worker slot."""
        out = {"CPU": self.cfg.cpus_per_worker, "GPU": self.cfg.gpus_per_worker}
        return {k: v for k, v in out.items() if v > 0}

    def reserve(self) -> None:
        """Create the placement group: one bundle per worker; wait until it is placed."""
        from ray.util.placement_group import placement_group

        n = self.opts.nproc
        self.pg = placement_group([self.bundle()] * n, strategy=self.cfg.strategy,
                                  name=f"odyssey-{os.path.basename(self.layout.run_dir)}")
        ready, _ = self.ray.wait([self.pg.ready()], timeout=self.cfg.start_timeout_s)
        if not ready:
            raise RuntimeError(
                f"Ray could not place {n} bundle(s) of {self.bundle()} with strategy "
                f"{self.cfg.strategy} within {self.cfg.start_timeout_s:.0f}s; cluster "
                f"resources: {self.ray.cluster_resources()}")

    def _new_actor(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self._remote_cls.options(
            num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker,
            max_restarts=0, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=bundle),
        ).remote()

    def _actor_layout(self, rank: int, node: int) -> JobLayout:
        # Each actor is its own "node view": LOCAL_RANK 0 of 1, as Ray gives every actor
        # its own CUDA_VISIBLE_DEVICES; GROUP_RANK says which machine it is on. The actor
        # fills in its node's IP as the address its worker binds.
        return dataclasses.replace(self.layout, nnodes=max(len(self.nodes), 1),
                                   node_rank=node, rank_offset=rank, nproc=1)

    def _node_index(self, node_id: str) -> int:
        if node_id not in self.nodes:
            self.nodes.append(node_id)
        return self.nodes.index(node_id)

    # -- the Backend protocol (launch.supervise) -----------------------------------------
    def start_workers(self) -> Iterator[Worker]:
        """Place the bundles, start one actor per bundle, then the training script in
        each (rank = bundle); yields the workers once all run."""
        self.reserve()
        actors = [self._new_actor(b) for b in range(self.opts.nproc)]
        places = self.ray.get([a.where.remote() for a in actors],
                              timeout=self.cfg.start_timeout_s)
        for place in places:
            self._node_index(place["node_id"])
        starts = []
        for rank, (actor, place) in enumerate(zip(actors, places)):
            node = self._node_index(place["node_id"])
            self.slots[rank] = Slot(rank, rank, node, place["ip"], place["actor_pid"])
            starts.append(actor.start.remote(self.opts.cmd, self._actor_layout(rank, node),
                                             self.cwd, {}))
        pids = self.ray.get(starts, timeout=self.cfg.start_timeout_s)
        for rank, (actor, pid) in enumerate(zip(actors, pids)):
            self.workers[rank] = Worker(rank, 0, ActorProc(actor, pid, self.opts.poll_interval_s))
        yield from self.workers.values()

    def start_replacement(self, rank: int, local_rank: int) -> Worker:
        """Start replacement ``rank`` in a bundle whose worker has exited."""
        busy = {s.bundle for r, s in self.slots.items()
                if r in self.workers and self.workers[r].alive}
        free = [b for b in range(self.opts.nproc) if b not in busy]
        if not free:
            log.error("replacement rank %d: every bundle is busy; not started", rank)
            return never_started(rank)
        bundle, actor = free[0], None
        try:
            actor = self._new_actor(bundle)
            place = self.ray.get(actor.where.remote(), timeout=self.cfg.start_timeout_s)
            node = self._node_index(place["node_id"])
            pid = self.ray.get(actor.start.remote(
                self.opts.cmd, self._actor_layout(rank, node), self.cwd,
                {"RANK": str(rank), contract.ENV_JOIN: "1"}), timeout=self.cfg.start_timeout_s)
        except Exception as err:  # no resources in time, actor died at start...
            log.error("replacement rank %d could not start in bundle %d: %s: %s", rank,
                      bundle, type(err).__name__, err)
            if actor is not None:  # still pending or half started: free the bundle
                self.ray.kill(actor, no_restart=True)
            return never_started(rank)
        self.slots[rank] = Slot(bundle, rank, node, place["ip"], place["actor_pid"])
        self.workers[rank] = Worker(rank, 0, ActorProc(actor, pid, self.opts.poll_interval_s))
        return self.workers[rank]

    def worker_record(self, worker: Worker) -> dict[str, Any]:
        """Spawn record: the actor's node, IP (the worker's address), pid and bundle."""
        slot = self.slots.get(worker.rank)
        if slot is None:  # a replacement that never started
            return {"rank": worker.rank, "pid": worker.pid, "node": None, "host": None}
        return {"rank": worker.rank, "pid": worker.pid, "node": slot.node, "host": slot.ip,
                "actor_pid": slot.actor_pid, "bundle": slot.bundle}

    def describe(self) -> str:
        """Actors, nodes and placement, for the start-up log line."""
        return (f"{self.opts.nproc} worker actor(s) on {len(self.nodes)} node(s), placement "
                f"{self.bundle()} x {self.cfg.strategy}")

    def launcher_info(self, final: bool) -> dict[str, Any]:
        """The actors (rank -> node, address, actor pid, bundle), so tools can kill one;
        at the end, which actors died."""
        info: dict[str, Any] = {
            "backend": "ray", "nnodes": len(self.nodes), "host": self.layout.store_addr,
            "actors": {str(r): {"node": s.node, "ip": s.ip, "actor_pid": s.actor_pid,
                                "bundle": s.bundle} for r, s in self.slots.items()},
        }
        if final:
            info["actors_lost"] = {str(r): w.proc.lost for r, w in self.workers.items()
                                   if getattr(w.proc, "lost", None)}
        return info

    def release(self) -> None:
        """Remove the placement group (Ray kills the actors still in it)."""
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception as err:  # best effort at exit
                log.debug("removing the placement group: %s", err)
            self.pg = None


def run_ray(opts: LaunchOptions) -> int:
    """Entry point of ``odyssey run --backend ray``; returns the process exit status."""
    try:
        import ray
    except ImportError as err:
        log.error("--backend ray needs the ray package (pip install 'odyssey-train[ray]'): "
                  "%s", err)
        return 2
    run_dir = make_run_dir(opts.run_dir)
    with RunDirLock(run_dir, opts.job_id):  # one job per run directory, as without Ray
        return _run_ray(ray, opts, run_dir)


def _run_ray(ray, opts: LaunchOptions, run_dir: str) -> int:
    cfg: RayConfig = opts.ray
    token = read_token(opts.token_file) if opts.token_file else new_token()
    write_token(run_dir, token)
    local = cfg.address is None
    try:
        if local:
            ray.init(num_cpus=max(1, int(round(opts.nproc * cfg.cpus_per_worker))),
                     include_dashboard=False,
                     _temp_dir=cfg.temp_dir, logging_level=logging.WARNING,
                     configure_logging=False)
        else:
            ray.init(address=cfg.address, logging_level=logging.WARNING,
                     configure_logging=False)
    except Exception as err:
        log.error("cannot start or join Ray (%s): %s: %s", cfg.address or "local instance",
                  type(err).__name__, err)
        return 1
    hosted = None
    try:
        if opts.store_endpoint:  # run apart (odyssey store); refused if already used
            hosted = use_external_store(opts.store_endpoint)
        else:
            # Local instance: loopback. A cluster: the driver's address, which workers
            # on other nodes can reach.
            hosted = host_store("127.0.0.1" if local else ray.util.get_node_ip_address(),
                                opts.store_port)
        layout = JobLayout(
            world_size=opts.nproc, nnodes=1, node_rank=0, rank_offset=0, nproc=opts.nproc,
            store_addr=hosted.addr, store_port=hosted.port, run_dir=run_dir,
            run_id=opts.run_id, role=opts.role, host="", token=token)  # host: per actor
        return supervise(opts, RayJob(ray, opts, layout), SafeStore(hosted.store))
    except Exception as err:
        log.error("Ray launch failed: %s: %s", type(err).__name__, err)
        return 1
    finally:
        ray.shutdown()
        if hosted is not None:
            hosted.close()

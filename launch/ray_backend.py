"""``odyssey run --backend ray``: the same job as Ray actors in a placement group.

One actor per worker slot (one placement-group bundle each) starts the training script as
its child process, with the environment ``odyssey run`` gives its workers, so a script
cannot tell which launcher started it. The driver hosts the store (or connects to one run
apart with ``odyssey store``) and runs the same supervision loop as the torchrun path
(:mod:`launch.agent`). An actor that dies -- ``ray.kill``, its process SIGKILLed, its node
lost -- becomes an exit record of its rank, just like a worker process the torchrun path
reaps, so survivors recover the same way. ``import ray`` happens only in here. See
``docs/ray.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launch.agent import Agent, AgentConfig, exit_status, kill_all_now
from launch.ray_actor import ActorProc, WorkerHost, never_started
from launch.store import SafeStore, host_store
from launch.workers import JobLayout, Worker
from odyssey import contract

if TYPE_CHECKING:
    from launch.options import LaunchOptions

log = logging.getLogger("launch")

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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


@dataclass
class Slot:
    """One placement-group bundle and what runs in it."""

    bundle: int
    rank: int
    node: int
    ip: str
    actor_pid: int


class RayJob:
    """Placement group, actors and the hosted store of one job on a Ray cluster."""

    def __init__(self, ray: Any, opts: LaunchOptions, run_dir: str) -> None:
        self.ray = ray
        self.opts = opts
        self.cfg: RayConfig = opts.ray
        self.run_dir = run_dir
        self.pg: Any = None
        self.slots: dict[int, Slot] = {}
        self.nodes: list[str] = []  # node ids in order of first appearance
        self.store_addr = ""
        self.store_port = 0
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
                                  name=f"odyssey-{os.path.basename(self.run_dir)}")
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

    def _layout(self, rank: int, node: int) -> JobLayout:
        # Each actor is its own "node view": LOCAL_RANK 0 of 1, as Ray gives every actor
        # its own CUDA_VISIBLE_DEVICES; GROUP_RANK says which machine it is on.
        return JobLayout(
            world_size=self.opts.nproc, nnodes=max(len(self.nodes), 1), node_rank=node,
            rank_offset=rank, nproc=1, store_addr=self.store_addr,
            store_port=self.store_port, run_dir=self.run_dir, run_id=self.opts.run_id,
            role=self.opts.role)

    def _node_index(self, node_id: str) -> int:
        if node_id not in self.nodes:
            self.nodes.append(node_id)
        return self.nodes.index(node_id)

    def start_all(self, store: SafeStore) -> list[Worker]:
        """Start one actor per bundle, then the training script in each (rank = bundle)."""
        actors = [self._new_actor(b) for b in range(self.opts.nproc)]
        places = self.ray.get([a.where.remote() for a in actors],
                              timeout=self.cfg.start_timeout_s)
        for place in places:
            self._node_index(place["node_id"])
        starts = []
        for rank, (actor, place) in enumerate(zip(actors, places)):
            node = self._node_index(place["node_id"])
            self.slots[rank] = Slot(rank, rank, node, place["ip"], place["actor_pid"])
            starts.append(actor.start.remote(self.opts.cmd, self._layout(rank, node),
                                             self.cwd, {}))
        pids = self.ray.get(starts, timeout=self.cfg.start_timeout_s)
        workers = []
        for rank, (actor, pid) in enumerate(zip(actors, pids)):
            slot = self.slots[rank]
            workers.append(Worker(rank, 0, ActorProc(actor, pid, self.opts.poll_interval_s)))
            store.set(contract.worker_key(rank), json.dumps(
                {"rank": rank, "pid": pid, "node": slot.node, "host": slot.ip,
                 "actor_pid": slot.actor_pid, "bundle": slot.bundle}))
        return workers

    def replacement(self, agent: Agent, index: int) -> Worker:
        """Start the index-th replacement worker in a bundle whose worker has exited."""
        rank = self.opts.nproc + index
        busy = {s.bundle for r, s in self.slots.items()
                if r in agent.workers and agent.workers[r].alive}
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
                self.opts.cmd, self._layout(rank, node), self.cwd,
                {"RANK": str(rank), contract.ENV_JOIN: "1"}), timeout=self.cfg.start_timeout_s)
        except Exception as err:  # no resources in time, actor died at start...
            log.error("replacement rank %d could not start in bundle %d: %s: %s", rank,
                      bundle, type(err).__name__, err)
            if actor is not None:  # still pending or half started: free the bundle
                self.ray.kill(actor, no_restart=True)
            return never_started(rank)
        self.slots[rank] = Slot(bundle, rank, node, place["ip"], place["actor_pid"])
        return Worker(rank, 0, ActorProc(actor, pid, self.opts.poll_interval_s))

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
    from launch.run import _external_store, _make_run_dir, default_run_dir

    try:
        import ray
    except ImportError as err:
        log.error("--backend ray needs the ray package (pip install 'odyssey-train[ray]'): "
                  "%s", err)
        return 2
    cfg: RayConfig = opts.ray
    run_dir = _make_run_dir(opts.run_dir or default_run_dir())
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
    job = RayJob(ray, opts, run_dir)
    try:
        if opts.store_endpoint:  # run apart (odyssey store); refused if already used
            hosted = _external_store(opts.store_endpoint)
        else:
            # Local instance: loopback. A cluster: the driver's address, which workers
            # on other nodes can reach.
            hosted = host_store("127.0.0.1" if local else ray.util.get_node_ip_address(),
                                opts.store_port)
        job.store_addr, job.store_port = hosted.addr, hosted.port
        return _supervise(opts, job, SafeStore(hosted.store))
    except Exception as err:
        log.error("Ray launch failed: %s: %s", type(err).__name__, err)
        return 1
    finally:
        job.release()
        ray.shutdown()
        if hosted is not None:
            hosted.close()


def _supervise(opts: LaunchOptions, job: RayJob, store: SafeStore) -> int:
    from launch.run import _print_summary

    agent = Agent([], store, AgentConfig(
        poll_interval_s=opts.poll_interval_s, shutdown_timeout_s=opts.shutdown_timeout_s,
        finish_grace_s=opts.finish_grace_s, signals=opts.signals,
        rejoin_after_s=opts.rejoin_after_s))
    restore_signals = agent.install_signal_handlers()
    try:
        t0 = time.monotonic()
        job.reserve()
        for worker in job.start_all(store):
            agent.add_worker(worker)
        agent.enable_spawning(lambda index, _local: job.replacement(agent, index))
        log.info("store %s:%d, %d worker actor(s) on %d node(s), placement %s x %s, started "
                 "in %.1fs, run dir %s", job.store_addr, job.store_port, opts.nproc,
                 len(job.nodes), job.bundle(), job.cfg.strategy, time.monotonic() - t0,
                 job.run_dir)
        _write_launcher_file(job, agent, None, None)
        try:
            result = agent.run()
        except BaseException:
            kill_all_now(list(agent.workers.values()))
            raise
        if result.job_status is None and store.check(contract.JOB_STATUS):
            result.job_status = store.get_text(contract.JOB_STATUS)
        code = exit_status(result, result.exits, expected=opts.nproc)
        ranks = sorted(set(range(opts.nproc)) | set(result.exits))
        _print_summary(result, result.exits, ranks, code)  # type: ignore[arg-type]
        _write_launcher_file(job, agent, result, code)
        return code
    finally:
        restore_signals()


def _write_launcher_file(job: RayJob, agent: Agent, result: Any, code: int | None) -> None:
    """``<run dir>/launcher-node0.json``, as the torchrun path writes it, plus the actors.

    ``odyssey inject`` finds the store here; ``actors`` maps rank -> node, address,
    actor pid and bundle, so tools (and tests) can kill an actor.
    """
    info: dict[str, Any] = {
        "backend": "ray", "node_rank": 0, "nnodes": len(job.nodes),
        "host": job.store_addr, "launcher_pid": os.getpid(), "store_addr": job.store_addr,
        "store_port": job.store_port, "world_size": job.opts.nproc, "cmd": job.opts.cmd,
        "workers": {str(r): w.pid for r, w in agent.workers.items()},
        "actors": {str(r): {"node": s.node, "ip": s.ip, "actor_pid": s.actor_pid,
                            "bundle": s.bundle} for r, s in job.slots.items()},
    }
    if result is not None:
        info["exits"] = {str(r): json.loads(e.to_json()) for r, e in result.exits.items()}
        info["fenced"] = {str(r): why for r, why in result.fenced.items()}
        info["actors_lost"] = {str(r): w.proc.lost for r, w in agent.workers.items()
                               if getattr(w.proc, "lost", None)}
        info["job_status"] = result.job_status
        info["exit_code"] = code
    path = os.path.join(job.run_dir, contract.launcher_file(0))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)

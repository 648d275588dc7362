"""Launch a training script on N workers like torchrun, keeping survivors when one dies.

``odyssey run`` = torchrun's command line + a launcher-hosted store + per-exit records +
fencing, without torch's restart-everything policy. See ``docs/launcher.md``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from launch.agent import Agent, AgentConfig, AgentResult, exit_status, kill_all_now
from launch.node_watch import NodeWatchConfig, NodeWatcher, publish_job
from launch.options import LaunchOptions, UsageError, build_parser, resolve
from launch.store import HostedStore, SafeStore, bind_addr_for, connect_store, host_store
from launch.workers import JobLayout, hostname, spawn, worker_env
from odyssey import contract

log = logging.getLogger("launch")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``odyssey run``; returns the process exit status."""
    # Before torch loads: its C++ warnings (e.g. a rendezvous peer gone at shutdown) print
    # multi-line stack traces that bury the launcher's own lines. Workers inherit this.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = resolve(args, parser)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"odyssey run: error: {err}", file=sys.stderr)
        return 2
    _setup_logging("odyssey run")
    try:
        if opts.backend == "ray":
            from launch.ray_backend import run_ray

            return run_ray(opts)
        return run_multi_node(opts) if opts.multi_node else run_single_node(opts)
    except KeyboardInterrupt:
        # Only reachable before workers exist (the agent handles signals after that).
        log.error("interrupted")
        return 130


def run_single_node(opts: LaunchOptions) -> int:
    """Host the store on 127.0.0.1, spawn ``opts.nproc`` workers, supervise them."""
    run_dir = _make_run_dir(opts.run_dir or default_run_dir())
    try:
        hosted = (_external_store(opts.store_endpoint) if opts.store_endpoint
                  else host_store("127.0.0.1", opts.store_port))
    except OSError as err:
        log.error("cannot host the store on 127.0.0.1:%d: %s", opts.store_port, err)
        return 1
    except RuntimeError as err:  # --store-endpoint: unreachable, or used by another job
        log.error("cannot use the store at %s: %s", opts.store_endpoint, err)
        return 1
    try:
        layout = JobLayout(
            world_size=opts.nproc, nnodes=1, node_rank=0, rank_offset=0, nproc=opts.nproc,
            store_addr=hosted.addr, store_port=hosted.port, run_dir=run_dir,
            run_id=opts.run_id, role=opts.role,
        )
        return _supervise(opts, layout, hosted.store)
    finally:
        hosted.close()


def _external_store(endpoint: str) -> HostedStore:
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


def run_multi_node(opts: LaunchOptions) -> int:
    """Rendezvous with the other launchers; node 0 hosts the store; supervise local workers."""
    from launch import rendezvous

    hosted = None

    def start_store(advertise_addr: str) -> tuple[str, int]:
        nonlocal hosted
        if opts.store_endpoint:  # node 0 only passes on the store run apart
            addr, _, port = opts.store_endpoint.rpartition(":")
            return addr, int(port)
        hosted = host_store(bind_addr_for(advertise_addr), opts.store_port, advertise_addr)
        return hosted.addr, hosted.port

    try:
        node = rendezvous.join(
            opts.rdzv_backend, opts.rdzv_endpoint, opts.run_id, opts.min_nodes,
            opts.max_nodes, opts.local_addr, opts.rdzv_configs, opts.nproc, start_store,
            opts.run_dir or default_run_dir(),
        )
    except Exception as err:  # rendezvous timeouts, unreachable endpoints, port clashes
        log.error("rendezvous failed: %s: %s", type(err).__name__, err)
        if hosted is not None:
            hosted.close()
        return 1
    _setup_logging(f"odyssey run node{node.node_rank}")
    try:
        raw_store = hosted.store if hosted is not None else connect_store(
            node.store_addr, node.store_port)
        layout = JobLayout(
            world_size=node.world_size, nnodes=node.nnodes, node_rank=node.node_rank,
            rank_offset=node.rank_offset, nproc=opts.nproc, store_addr=node.store_addr,
            store_port=node.store_port, run_dir=_make_run_dir(node.run_dir),
            run_id=opts.run_id, role=opts.role,
        )
        return _supervise(opts, layout, raw_store)
    finally:
        node.shutdown()
        if hosted is not None:
            hosted.close()


def _supervise(opts: LaunchOptions, layout: JobLayout, raw_store: Any) -> int:
    """Spawn this node's workers, run the agent loop, then report and pick the exit status."""
    store = SafeStore(raw_store)
    agent = Agent([], store, AgentConfig(
        poll_interval_s=opts.poll_interval_s, shutdown_timeout_s=opts.shutdown_timeout_s,
        finish_grace_s=opts.finish_grace_s, signals=opts.signals,
        beat_key=contract.node_beat_key(layout.node_rank) if layout.nnodes > 1 else None,
        node_rank=layout.node_rank, rejoin_after_s=opts.rejoin_after_s,
    ))
    # Handlers go in before the first spawn, so a signal can never leave workers behind,
    # and stay until the summary is out, so a late Ctrl-C cannot cut it short.
    restore_signals = agent.install_signal_handlers()
    try:
        return _spawn_and_supervise(opts, layout, store, agent)
    finally:
        restore_signals()


def _spawn_and_supervise(
    opts: LaunchOptions, layout: JobLayout, store: SafeStore, agent: Agent
) -> int:
    """The body of :func:`_supervise`: spawn, supervise, wait for nodes, summarise."""
    is_multi = layout.nnodes > 1
    try:
        for local_rank in range(layout.nproc):
            rank = layout.global_rank(local_rank)
            worker = spawn(opts.cmd, worker_env(layout, local_rank), rank, local_rank)
            agent.add_worker(worker)
            store.set(contract.worker_key(rank), json.dumps(
                {"rank": rank, "pid": worker.pid, "node": layout.node_rank, "host": hostname()}))
        def spawn_replacement(index: int, local_rank: int):
            rank = layout.world_size + index  # fresh global ranks after the launched ones
            env = worker_env(layout, local_rank)
            env.update({"RANK": str(rank), contract.ENV_JOIN: "1"})
            worker = spawn(opts.cmd, env, rank, local_rank)
            store.set(contract.worker_key(rank), json.dumps(  # so node watchers see it
                {"rank": rank, "pid": worker.pid, "node": layout.node_rank,
                 "host": hostname()}))
            return worker

        agent.enable_spawning(spawn_replacement)
        if is_multi:
            publish_job(store, layout.nnodes, layout.world_size, opts.node_timeout_s)
            agent.enable_node_watch(NodeWatcher(
                store, [n for n in range(layout.nnodes) if n != layout.node_rank],
                layout.world_size, NodeWatchConfig(node_timeout_s=opts.node_timeout_s),
                who=f"node {layout.node_rank}"))
        log.info("store %s:%d, %d worker(s) (ranks %d..%d of %d), run dir %s",
                 layout.store_addr, layout.store_port, layout.nproc, layout.rank_offset,
                 layout.rank_offset + layout.nproc - 1, layout.world_size, layout.run_dir)
        _write_launcher_file(layout, opts, agent, None, None)
        result = agent.run()
        if is_multi:
            store.set(contract.node_done_key(layout.node_rank), "1")
            if layout.node_rank == 0:
                # The store lives here: keep it up until every node's workers are done.
                agent.wait_for_nodes(layout.nnodes, opts.node_timeout_s)
                result.received_signal = agent.received_signal
    except BaseException:
        kill_all_now(list(agent.workers.values()))
        raise
    if result.job_status is None and store.check(contract.JOB_STATUS):
        result.job_status = store.get_text(contract.JOB_STATUS)
    # Node 0 outlives the others and judges the whole job; other nodes judge their own.
    if is_multi and layout.node_rank == 0:
        exits, ranks = _gather_exits(store, layout, result), range(layout.world_size)
    else:
        exits = result.exits
        ranks = range(layout.rank_offset, layout.rank_offset + layout.nproc)
    code = exit_status(result, exits, expected=len(ranks))
    _print_summary(result, exits, ranks, code)
    _write_launcher_file(layout, opts, agent, result, code)
    return code


def _gather_exits(
    store: SafeStore, layout: JobLayout, result: AgentResult
) -> dict[int, contract.ExitRecord]:
    """Exit records of every rank this launcher can see: its own plus the store's."""
    exits = dict(result.exits)
    for rank in range(layout.world_size):
        key = contract.exit_key(rank)
        if rank in exits or not store.check(key):
            continue
        text = store.get_text(key)
        if text is not None:
            exits[rank] = contract.ExitRecord(**json.loads(text))
    return exits


def _print_summary(
    result: AgentResult, exits: dict[int, contract.ExitRecord], ranks: range, code: int
) -> None:
    if result.received_signal is not None:
        why = f"stopped by {result.received_signal.name}"
    elif result.job_status is not None:
        why = f"job status {result.job_status!r}"
    else:
        why = "no job status; judged by worker exit codes"
    lines = [f"summary: {why} -> exit {code}"]
    for rank in ranks:
        record = exits.get(rank)
        if record is None:
            lines.append(f"  rank {rank:>3}  (no exit recorded)")
            continue
        fenced = result.fenced.get(rank)
        note = f"  (fenced: {fenced or '-'})" if fenced is not None else ""
        lines.append(f"  rank {rank:>3}  pid {record.pid:>7}  {record.describe()}{note}")
    for line in lines:
        log.info("%s", line)


def default_run_dir(now: float | None = None) -> str:
    """``runs/<YYYYmmdd-HHMMSS>`` under the current directory, suffixed if taken."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.localtime(now)))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _make_run_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


def _write_launcher_file(
    layout: JobLayout, opts: LaunchOptions, agent: Agent,
    result: AgentResult | None, code: int | None,
) -> None:
    """``<run dir>/launcher-node<N>.json``: how to reach the store, pids, and at the end, exits.

    Tools (tests, fault injectors) find a running job's store here.
    """
    info: dict[str, Any] = {
        "node_rank": layout.node_rank, "nnodes": layout.nnodes, "host": hostname(),
        "launcher_pid": os.getpid(), "store_addr": layout.store_addr,
        "store_port": layout.store_port, "world_size": layout.world_size,
        "cmd": opts.cmd, "workers": {str(r): w.pid for r, w in agent.workers.items()},
    }
    if result is not None:
        info["exits"] = {str(r): json.loads(e.to_json()) for r, e in result.exits.items()}
        info["fenced"] = {str(r): why for r, why in result.fenced.items()}
        info["job_status"] = result.job_status
        info["exit_code"] = code
    path = os.path.join(layout.run_dir, contract.launcher_file(layout.node_rank))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)  # atomic: readers never see half a file


def _setup_logging(prefix: str) -> None:
    logger = logging.getLogger("launch")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

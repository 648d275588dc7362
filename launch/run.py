"""Launch a training script on N workers like torchrun, keeping survivors when one dies.

``odyssey run`` = torchrun's command line + a launcher-hosted store + per-exit records +
fencing, without torch's restart-everything policy. See ``docs/launcher.md``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from launch import preflight, rendezvous
from launch.options import LaunchOptions, UsageError, build_parser, resolve
from launch.ray_backend import run_ray
from launch.run_files import default_run_dir, make_run_dir
from launch.run_lock import RunDirLock, RunDirLocked
from launch.store import SafeStore, bind_addr_for, connect_store, host_store, use_external_store
from launch.supervise import supervise
from launch.workers import JobLayout, ProcessBackend
from odyssey.control import TokenError, new_token, read_token, write_token
from odyssey.failure_report import BAD_INPUT, clear_reports

log = logging.getLogger("launch")

LOOPBACK = "127.0.0.1"
"""Where a single-node job's store listens and its workers bind."""


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
        return BAD_INPUT
    try:  # the job's own input, once, before any worker starts: one line if refused
        preflight.check(opts)
    except UsageError as err:
        print(f"odyssey run: error: {err}", file=sys.stderr)
        return BAD_INPUT
    setup_logging("odyssey run")
    try:
        if opts.backend == "ray":
            return run_ray(opts)
        return run_multi_node(opts) if opts.multi_node else run_single_node(opts)
    except (TokenError, RunDirLocked) as err:
        log.error("%s", err)
        return BAD_INPUT
    except KeyboardInterrupt:
        # Only reachable before workers exist (the agent handles signals after that).
        log.error("interrupted")
        return 130


def job_token(opts: LaunchOptions, run_dir: str) -> str:
    """This job's token (from --token-file, else a fresh one), saved in the run dir."""
    token = read_token(opts.token_file) if opts.token_file else new_token()
    write_token(run_dir, token)
    return token


def run_single_node(opts: LaunchOptions) -> int:
    """Host the store on 127.0.0.1, spawn ``opts.nproc`` workers, supervise them."""
    run_dir = make_run_dir(opts.run_dir)
    with RunDirLock(run_dir, opts.job_id):
        return _run_single_node(opts, run_dir)


def _run_single_node(opts: LaunchOptions, run_dir: str) -> int:
    clear_reports(run_dir)  # failure records of an earlier job here are not this job's
    token = job_token(opts, run_dir)
    try:
        hosted = (use_external_store(opts.store_endpoint) if opts.store_endpoint
                  else host_store(LOOPBACK, opts.store_port))
    except OSError as err:
        log.error("cannot host the store on %s:%d: %s", LOOPBACK, opts.store_port, err)
        return 1
    except RuntimeError as err:  # --store-endpoint: unreachable, or used by another job
        log.error("cannot use the store at %s: %s", opts.store_endpoint, err)
        return 1
    try:
        layout = JobLayout(
            world_size=opts.nproc, nnodes=1, node_rank=0, rank_offset=0, nproc=opts.nproc,
            store_addr=hosted.addr, store_port=hosted.port, run_dir=run_dir,
            run_id=opts.run_id, role=opts.role, host=LOOPBACK, token=token,
        )
        return supervise(opts, ProcessBackend(opts.cmd, layout), SafeStore(hosted.store))
    finally:
        hosted.close()


def run_multi_node(opts: LaunchOptions) -> int:
    """Rendezvous with the other launchers; node 0 hosts the store; supervise local workers."""
    hosted = None
    node_addr = rendezvous.node_address(opts)

    def start_store() -> tuple[str, int]:
        nonlocal hosted
        if opts.store_endpoint:  # node 0 only passes on the store run apart
            addr, _, port = opts.store_endpoint.rpartition(":")
            return addr, int(port)
        hosted = host_store(bind_addr_for(node_addr), opts.store_port, node_addr)
        return hosted.addr, hosted.port

    own_token = read_token(opts.token_file) if opts.token_file else None
    try:
        node = rendezvous.join(opts, node_addr, start_store,
                               opts.run_dir or default_run_dir(), own_token)
    except TokenError:
        if hosted is not None:
            hosted.close()
        raise
    except Exception as err:  # rendezvous timeouts, unreachable endpoints, port clashes
        log.error("rendezvous failed: %s: %s", type(err).__name__, err)
        if hosted is not None:
            hosted.close()
        return 1
    setup_logging(f"odyssey run node{node.node_rank}")
    lock = None
    try:
        run_dir = make_run_dir(node.run_dir)
        if node.node_rank == 0:  # one lock per job; the nodes may share the directory
            lock = RunDirLock(run_dir, opts.job_id)
            lock.acquire()
        clear_reports(run_dir)
        write_token(run_dir, node.token)
        raw_store = hosted.store if hosted is not None else connect_store(
            node.store_addr, node.store_port)
        layout = JobLayout(
            world_size=node.world_size, nnodes=node.nnodes, node_rank=node.node_rank,
            rank_offset=node.rank_offset, nproc=opts.nproc, store_addr=node.store_addr,
            store_port=node.store_port, run_dir=run_dir, run_id=opts.run_id,
            role=opts.role, host=node_addr, token=node.token,
        )
        return supervise(opts, ProcessBackend(opts.cmd, layout), SafeStore(raw_store))
    finally:
        if lock is not None:
            lock.release()
        node.shutdown()
        if hosted is not None:
            hosted.close()


def setup_logging(prefix: str) -> None:
    """Launcher log lines on stderr, each prefixed (e.g. ``[odyssey run node1]``)."""
    logger = logging.getLogger("launch")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

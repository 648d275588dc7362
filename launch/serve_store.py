"""Host a job's store apart from its workers: `odyssey store --host ADDR --port PORT`.

The store is the one piece of a running job that nothing can replace: every exit record,
fence, commit decision and membership key lives there. `odyssey run` hosts it inside the
launcher (node 0's for multi-node jobs), so losing that launcher's machine loses the job.
Run this on a machine that runs no workers (a login or head node) and point every launcher
at it with `odyssey run --store-endpoint HOST:PORT ...`. Serve one job per store: a
finished job's keys would mislead the next one (`odyssey run` refuses such a store).

    odyssey store --host 10.0.0.5 --port 29600            # on the store machine
    odyssey run --store-endpoint 10.0.0.5:29600 ...        # on every node

It runs until SIGINT/SIGTERM, or, with --exit-after-done S, S seconds after the job has
set its status (time for launchers to record the last exits). While a multi-node job
runs, it also watches the nodes' heartbeats like every launcher does, and declares a node
lost once its heartbeat is older than the job's --node-timeout (launch/node_watch.py):
with the store apart, it is the one watcher that outlives any node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from launch.node_watch import NodeWatchConfig, NodeWatcher, read_job
from launch.store import SafeStore, host_store
from odyssey import contract


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odyssey store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; use one the worker nodes can reach, or "
                   "0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=29600,
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--endpoint-file", default=None, metavar="PATH",
                   help="write {\"addr\", \"port\", \"pid\"} here once listening (how "
                   "scripts learn a port picked with --port 0)")
    p.add_argument("--exit-after-done", type=float, default=None, metavar="SECONDS",
                   help="exit this long after odyssey/job/status is set (default: run until "
                   "SIGINT/SIGTERM)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port < 2**16:
        print(f"odyssey store: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.exit_after_done is not None and args.exit_after_done < 0:
        print("odyssey store: --exit-after-done must be >= 0", file=sys.stderr)
        return 2
    try:
        hosted = host_store(args.host, args.port)
    except OSError as err:
        print(f"odyssey store: cannot listen on {args.host}:{args.port}: {err}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.endpoint_file:
        tmp = f"{args.endpoint_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"addr": hosted.addr, "port": hosted.port, "pid": os.getpid()}, f)
        os.replace(tmp, args.endpoint_file)  # readers never see half a file
    print(f"odyssey store: serving on {hosted.addr}:{hosted.port} (pid {os.getpid()}); "
          f"launchers: odyssey run --store-endpoint {hosted.addr}:{hosted.port} ...",
          flush=True)
    done_at = None
    watcher: NodeWatcher | None = None
    client = SafeStore(hosted.store)
    while not stop.wait(0.1):
        if watcher is None:
            watcher = _watcher_for_job(client)
        if watcher is not None:
            for node in watcher.poll():
                print(f"odyssey store: node {node} declared lost "
                      f"(heartbeat older than {watcher.config.node_timeout_s:g}s)", flush=True)
        if args.exit_after_done is None:
            continue
        if done_at is None and hosted.store.check([contract.JOB_STATUS]):
            done_at = time.monotonic()
            status = hosted.store.get(contract.JOB_STATUS).decode()
            print(f"odyssey store: job status {status!r}; exiting in "
                  f"{args.exit_after_done:g}s", flush=True)
        if done_at is not None and time.monotonic() - done_at >= args.exit_after_done:
            break
    hosted.close()
    print("odyssey store: stopped", flush=True)
    return 0


def _watcher_for_job(store: SafeStore) -> NodeWatcher | None:
    """A watcher of every node once a multi-node job has published its layout."""
    job = read_job(store)
    if job is None:
        return None
    return NodeWatcher(store, list(range(int(job["nnodes"]))), int(job["world_size"]),
                       NodeWatchConfig(node_timeout_s=float(job["node_timeout_s"]),
                                       peers=0),
                       who="odyssey store")


if __name__ == "__main__":
    sys.exit(main())

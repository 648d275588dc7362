"""One supervision of one launcher's workers, whatever starts them.

:func:`supervise` runs the agent loop (:mod:`launch.agent`) over a :class:`Backend`:
local processes (:class:`launch.workers.ProcessBackend`) or Ray actors
(:class:`launch.ray_backend.RayJob`). It starts the workers, serves replacement
requests, beats and watches the other nodes of a multi-node job, then writes the
summary, the exit status and the launcher file, the same way for every backend.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

from launch.agent import Agent, AgentConfig, AgentResult
from launch.node_watch import NodeWatchConfig, NodeWatcher, publish_job
from launch.options import LaunchOptions
from launch.prometheus import MetricsExporter
from launch.run_files import write_launcher_file
from launch.store import SafeStore, connect_store
from launch.workers import JobLayout, Worker, kill_all_now
from odyssey import contract
from odyssey.control import token_check
from odyssey.failure_report import BAD_INPUT, read_reports

log = logging.getLogger("launch")


class Backend(Protocol):
    """How one launcher starts its workers and gives their resources back."""

    layout: JobLayout
    """This launcher's part of the job: node, launched ranks, store, run dir, token."""

    def start_workers(self) -> Iterator[Worker]:
        """Start the launched workers, yielding each once it runs."""
        ...

    def start_replacement(self, rank: int, local_rank: int) -> Worker:
        """Start a worker that joins the running job as ``rank``."""
        ...

    def worker_record(self, worker: Worker) -> dict[str, Any]:
        """The JSON spawn record of ``worker`` (``odyssey/workers/{rank}``)."""
        ...

    def describe(self) -> str:
        """Where the workers run, for the start-up log line."""
        ...

    def launcher_info(self, final: bool) -> dict[str, Any]:
        """Backend-specific fields of the launcher file (``final``: at the end)."""
        ...

    def release(self) -> None:
        """Give back what the backend holds (placement groups...); called once, last."""
        ...


def supervise(opts: LaunchOptions, backend: Backend, store: SafeStore) -> int:
    """Start ``backend``'s workers, supervise them to the end; the exit status."""
    layout = backend.layout
    multi = layout.nnodes > 1
    agent = Agent([], store, AgentConfig(
        poll_interval_s=opts.poll_interval_s, shutdown_timeout_s=opts.shutdown_timeout_s,
        finish_grace_s=opts.finish_grace_s, signals=opts.signals,
        beat_key=contract.node_beat_key(layout.node_rank) if multi else None,
        node_rank=layout.node_rank, rejoin_after_s=opts.rejoin_after_s, token=layout.token,
        stop_grace_s=opts.stop_grace_s,
    ))
    # Handlers go in before the first start, so a signal can never leave workers behind,
    # and stay until the summary is out, so a late Ctrl-C cannot cut it short.
    restore_signals = agent.install_signal_handlers()
    # node 0 serves the job's Prometheus metrics if its config asks (launch/prometheus.py)
    exporter = MetricsExporter(lambda: connect_store(layout.store_addr, layout.store_port)
                               ) if layout.node_rank == 0 else None
    try:
        if exporter is not None:
            exporter.start()
        result = _run(opts, backend, store, agent)
        return _finish(opts, backend, store, agent, result)
    finally:
        if exporter is not None:
            exporter.stop()
        restore_signals()
        backend.release()


def _run(opts: LaunchOptions, backend: Backend, store: SafeStore, agent: Agent
         ) -> AgentResult:
    layout = backend.layout
    multi = layout.nnodes > 1
    try:
        t0 = time.monotonic()
        if layout.token is not None:  # lets `odyssey inject` refuse a wrong token early
            store.set(contract.TOKEN_CHECK, token_check(layout.token))
        for worker in backend.start_workers():
            agent.add_worker(worker)
            store.set(contract.worker_key(worker.rank), json.dumps(backend.worker_record(worker)))

        def start_replacement(index: int, local_rank: int) -> Worker:
            # Fresh global ranks after the launched ones, numbered in request order.
            worker = backend.start_replacement(layout.world_size + index, local_rank)
            store.set(contract.worker_key(worker.rank),  # so node watchers see it
                      json.dumps(backend.worker_record(worker)))
            return worker

        agent.enable_spawning(start_replacement)
        if multi:
            publish_job(store, layout.nnodes, layout.world_size, opts.node_timeout_s)
            me, n = layout.node_rank, layout.nnodes  # the next nodes in ring order
            agent.enable_node_watch(NodeWatcher(
                store, [(me + i) % n for i in range(1, n)],
                layout.world_size, NodeWatchConfig(node_timeout_s=opts.node_timeout_s),
                who=f"node {layout.node_rank}"))
        log.info("store %s:%d, %s, started in %.1fs, run dir %s", layout.store_addr,
                 layout.store_port, backend.describe(), time.monotonic() - t0, layout.run_dir)
        _write_info(opts, backend, agent, None, None)
        result = agent.run()
        if multi:
            store.set(contract.node_done_key(layout.node_rank), "1")
            if layout.node_rank == 0:
                # The store lives here: keep it up until every node's workers are done.
                agent.wait_for_nodes(layout.nnodes, opts.node_timeout_s)
                result.received_signal = agent.received_signal
    except BaseException:
        kill_all_now(list(agent.workers.values()))
        raise
    return result


def _finish(opts: LaunchOptions, backend: Backend, store: SafeStore, agent: Agent,
            result: AgentResult) -> int:
    """Judge the job, log the summary, write the final launcher file; the exit status."""
    layout = backend.layout
    if result.job_status is None and store.check(contract.JOB_STATUS):
        result.job_status = store.get_text(contract.JOB_STATUS)
    # Node 0 of a multi-node job outlives the others and judges the whole job; every
    # other launcher judges the ranks it launched.
    if layout.nnodes > 1 and layout.node_rank == 0:
        launched = range(layout.world_size)
        exits = _gather_exits(store, layout, result)
    else:
        launched = range(layout.rank_offset, layout.rank_offset + layout.nproc)
        exits = result.exits
    code = exit_status(result, exits, expected=len(launched))
    failed = [r for r in read_reports(layout.run_dir) if r.get("rank") in exits
              and exits[r["rank"]].exitcode != 0]
    if (code == 1 and result.job_status is None and failed
            and all(r["bad_input"] for r in failed)):
        code = BAD_INPUT  # every failed worker refused its input
    _print_summary(result, exits, sorted(set(launched) | set(result.exits)), code)
    _print_causes(failed)
    _write_info(opts, backend, agent, result, code)
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
    result: AgentResult, exits: dict[int, contract.ExitRecord], ranks: list[int], code: int
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


def _print_causes(failed: list[dict[str, Any]]) -> None:
    """Each distinct worker failure once, with the ranks that hit it: one line each."""
    by_cause: dict[str, list[dict[str, Any]]] = {}
    for record in failed:
        by_cause.setdefault(record["cause"], []).append(record)
    for cause, records in by_cause.items():
        ranks = ",".join(str(r["rank"]) for r in records)
        log.error("rank(s) %s failed: %s (traceback: %s)", ranks, cause, records[0]["log"])


def _write_info(opts: LaunchOptions, backend: Backend, agent: Agent,
                result: AgentResult | None, code: int | None) -> None:
    """The launcher file: how to reach the store, pids, and at the end, the exits."""
    layout = backend.layout
    info: dict[str, Any] = {
        "node_rank": layout.node_rank, "nnodes": layout.nnodes,
        "launcher_pid": os.getpid(), "store_addr": layout.store_addr,
        "store_port": layout.store_port, "world_size": layout.world_size,
        "workers_host": layout.host, "cmd": opts.cmd,
        "workers": {str(r): w.pid for r, w in agent.workers.items()},
    }
    if result is not None:
        info["exits"] = {str(r): json.loads(e.to_json()) for r, e in result.exits.items()}
        info["fenced"] = {str(r): why for r, why in result.fenced.items()}
        info["job_status"] = result.job_status
        info["exit_code"] = code
    info.update(backend.launcher_info(final=result is not None))
    write_launcher_file(layout.run_dir, layout.node_rank, info)


def exit_status(
    result: AgentResult, exits: dict[int, contract.ExitRecord], expected: int
) -> int:
    """The launcher's exit status.

    * Stopped by a signal: ``128 + signum`` (shell convention).
    * ``odyssey/job/status`` set: 0 if it is ``done``, else 1. A job that lost ranks and
      recovered still succeeds: that is the point of keeping survivors.
    * No status key: 0 if all ``expected`` workers have an exit record and every one
      exited 0, else 1 (a rank with no record, e.g. on a vanished node, is a failure).
    """
    if result.received_signal is not None:
        return 128 + int(result.received_signal)
    if result.job_status is not None:
        return 0 if result.job_status == contract.JOB_DONE else 1
    clean = len(exits) >= expected and all(r.exitcode == 0 for r in exits.values())
    return 0 if clean else 1

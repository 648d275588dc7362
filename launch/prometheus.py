"""Prometheus metrics of a running job, served by node 0's launcher.

Off by default; on when the job's config sets ``metrics.prometheus_addr`` (HOST:PORT;
port 0 picks a free one). Served by the launcher, not the leader: node 0's launcher
hosts the store and outlives every worker, so the scrape target stays where it is when
the leader is lost and another rank takes over, and no worker runs an HTTP server. A
thread reads the leader's status record (``contract.STATUS_RECORD``, odyssey/status.py)
every ``poll_s`` on its own store connection, learns the address from it, starts the
server once and turns each new record into the series below. ``contract.METRICS_ENDPOINT``
then says where it listens (``odyssey status`` prints it).

Series: ``odyssey_step``, ``odyssey_steps_per_second``, ``odyssey_samples_per_second``,
``odyssey_generation``, ``odyssey_alive_ranks``, ``odyssey_fenced_ranks``,
``odyssey_recoveries_total{kind,cause}`` (counter), ``odyssey_mttr_seconds`` and
``odyssey_detection_delay_seconds`` (histograms, one observation per recovery),
``odyssey_straggler_factor{rank}``, ``odyssey_checkpoint_step``,
``odyssey_checkpoint_age_seconds``, ``odyssey_status_age_seconds`` (how old the record
is: a stalled job shows here) and ``odyssey_job_finished``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from odyssey import contract
from odyssey.netaddr import split_endpoint

try:
    import prometheus_client as prom
except ImportError:  # the optional `prom` extra; the launcher works without it
    prom = None

log = logging.getLogger("launch")

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
"""Histogram buckets of MTTR and detection delay (10 ms to 5 min)."""


def available() -> bool:
    """Whether prometheus_client is installed."""
    return prom is not None


class JobMetrics:
    """The series, fed one status record at a time (counters and histograms only move
    for what is new since the previous record)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.step = prom.Gauge("odyssey_step", "Last committed step", registry=r)
        self.steps_per_s = prom.Gauge("odyssey_steps_per_second",
                                      "Committed steps per second (EWMA)", registry=r)
        self.samples_per_s = prom.Gauge("odyssey_samples_per_second",
                                        "Samples trained per second (EWMA)", registry=r)
        self.generation = prom.Gauge("odyssey_generation", "Current generation (membership "
                                     "changes so far)", registry=r)
        self.alive = prom.Gauge("odyssey_alive_ranks", "Ranks in the current generation",
                                registry=r)
        self.fenced = prom.Gauge("odyssey_fenced_ranks", "Ranks killed on the job's request",
                                 registry=r)
        self.recoveries = prom.Counter("odyssey_recoveries", "Recoveries, by the plan kind "
                                       "chosen and the cause", ["kind", "cause"], registry=r)
        self.mttr = prom.Histogram("odyssey_mttr_seconds", "Fault to every survivor running "
                                   "the new plan", buckets=SECONDS_BUCKETS, registry=r)
        self.detect = prom.Histogram("odyssey_detection_delay_seconds", "Fault to the first "
                                     "notice", buckets=SECONDS_BUCKETS, registry=r)
        self.straggler = prom.Gauge("odyssey_straggler_factor", "How many times slower a "
                                    "rank found straggling is", ["rank"], registry=r)
        self.ckpt_step = prom.Gauge("odyssey_checkpoint_step", "Step of the newest complete "
                                    "checkpoint", registry=r)
        self.ckpt_age = prom.Gauge("odyssey_checkpoint_age_seconds", "Seconds since the "
                                   "newest complete checkpoint (NaN: none)", registry=r)
        self.status_age = prom.Gauge("odyssey_status_age_seconds", "Seconds since the "
                                     "leader last updated the status", registry=r)
        self.finished = prom.Gauge("odyssey_job_finished", "1 once the job has finished",
                                   registry=r)
        self._record: dict = {}
        self._counted: dict[tuple[str, str], int] = {}
        self._observed: set[int] = set()  # generations whose MTTR is in the histograms
        self._stragglers: set[str] = set()
        self.ckpt_age.set_function(lambda: self._age((self._record.get("checkpoint") or {})
                                                     .get("time")))
        self.status_age.set_function(lambda: self._age(self._record.get("time")))

    @staticmethod
    def _age(when: float | None) -> float:
        return math.nan if when is None else max(0.0, time.time() - when)

    def update(self, rec: dict) -> None:
        """Take in a status record."""
        self._record = rec
        for gauge, key in ((self.step, "step"), (self.steps_per_s, "steps_per_s"),
                           (self.samples_per_s, "samples_per_s"),
                           (self.generation, "generation")):
            if rec.get(key) is not None:
                gauge.set(rec[key])
        self.alive.set(len(rec.get("members") or ()))
        self.fenced.set(len(rec.get("fenced") or ()))
        self.finished.set(1 if rec.get("state") == "finished" else 0)
        for c in rec.get("recovery_counts") or ():
            key = (c["kind"], c["cause"])
            new = c["count"] - self._counted.get(key, 0)
            if new > 0:
                self.recoveries.labels(*key).inc(new)
                self._counted[key] = c["count"]
        for e in rec.get("recoveries") or ():
            if e.get("mttr_s") is not None and e["generation"] not in self._observed:
                self._observed.add(e["generation"])
                self.mttr.observe(e["mttr_s"])
                if e.get("detect_s") is not None:
                    self.detect.observe(max(0.0, e["detect_s"]))
        now = {str(s["rank"]): s["factor"] for s in rec.get("stragglers") or ()}
        for rank in self._stragglers - set(now):
            self.straggler.remove(rank)
        for rank, factor in now.items():
            self.straggler.labels(rank).set(factor)
        self._stragglers = set(now)
        ckpt = rec.get("checkpoint")
        if ckpt:
            self.ckpt_step.set(ckpt["step"])


class MetricsExporter:
    """The launcher's thread: status record in, Prometheus endpoint out (see the module
    docstring). ``connect`` opens the thread's own store client."""

    def __init__(self, connect: Callable[[], Any], poll_s: float = 0.5):
        self.connect = connect
        self.poll_s = poll_s
        self.metrics: JobMetrics | None = None
        self.endpoint: str | None = None
        """``host:port`` the server listens on, once it does."""
        self._server = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prometheus", daemon=True)

    def start(self) -> MetricsExporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and serving (the launcher is about to exit)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.poll_s + 1)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _loop(self) -> None:
        try:
            store = self.connect()
        except Exception as err:  # noqa: BLE001 - metrics must never take the launcher down
            log.warning("Prometheus exporter: cannot reach the store: %s", err)
            return
        last = None
        while not self._stop.wait(self.poll_s):
            try:
                if not store.check([contract.STATUS_RECORD]):
                    continue
                raw = store.get(contract.STATUS_RECORD)
            except Exception:  # noqa: BLE001 - the store is going away with the job
                return
            if raw == last:
                continue
            last = raw
            rec = json.loads(raw)
            if self._server is None and not self._serve(rec.get("prometheus_addr") or "",
                                                        store):
                return  # metrics are off (or cannot be served): nothing more to do
            self.metrics.update(rec)

    def _serve(self, addr: str, store: Any) -> bool:
        """Start the HTTP server at ``addr``; False if off or impossible (logged)."""
        if not addr:
            return False
        if prom is None:
            log.error("metrics.prometheus_addr is %s but prometheus_client is not installed "
                      "(pip install 'odyssey-train[prom]'): no metrics endpoint", addr)
            return False
        host, port = split_endpoint(addr)
        self.metrics = JobMetrics()
        try:
            server, _ = prom.start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as err:
            log.error("cannot serve Prometheus metrics at %s: %s", addr, err)
            return False
        self._server = server
        self.endpoint = f"{host}:{server.server_address[1]}"
        store.set(contract.METRICS_ENDPOINT, self.endpoint)
        log.info("Prometheus metrics at http://%s/metrics", self.endpoint)
        return True

"""The job's live status record: what an SRE (`odyssey status`, Prometheus) sees.

The leader keeps one compact JSON record in the store (``contract.STATUS_RECORD``) and
rewrites it with one ``store.set`` on every committed step and every recovery:

``state`` (training | finished), ``time`` (wall), ``mode``, ``generation``, ``leader``,
``members`` ([{rank, node, host}]), ``plan`` ({pipelines, stages, ranks, kind, global_batch,
num_microbatches, microbatch_size, schedule}), ``step`` (last committed), ``steps``,
``steps_per_s`` and ``samples_per_s`` (EWMA over steps), ``step_time_s`` (last),
``loss``, ``recovery_counts`` ([{kind, cause, count}], every recovery of the run),
``recoveries`` (the last few: {generation, time, cause, chosen, ranks_lost, newcomers,
step, mttr_s, detect_s, phases}; ``mttr_s`` is None until the new plan's first step
committed), ``last_recovery``, ``stragglers`` ([{rank, factor, since_step}]),
``fenced`` (ranks the launcher killed on the job's request), ``checkpoint`` ({step,
time} of the newest complete checkpoint) and ``prometheus_addr`` (where node 0's
launcher should serve metrics; empty: nowhere).

A new leader (the old one was lost) starts from the record its predecessor left, so the
counts and history survive leader changes. When the run ends the leader also writes the
final record to ``RUN_DIR/status.json`` (the store goes away with the launcher).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from odyssey import contract
from odyssey.events import recovery_event
from odyssey.hooks import CommittedStep, FitResult, Recovery, TrainerHook
from planner.plan import Plan

RECENT_RECOVERIES = 20
"""Recoveries the record lists in full (counts cover all of them)."""
RATE_ALPHA = 0.3
"""EWMA weight of the newest step in steps/s and samples/s."""


class StatusPublisher(TrainerHook):
    """Keeps ``contract.STATUS_RECORD`` current (leader only); see the module docstring."""

    def __init__(self, store: dist.Store, rank: int, run_dir: Path, *, mode: str, steps: int,
                 prometheus_addr: str = "",
                 last_checkpoint: Callable[[], int | None] = lambda: None,
                 stragglers: Callable[[], list[dict]] = lambda: []):
        """`last_checkpoint`: the newest complete checkpoint's step this rank knows of;
        `stragglers`: the ranks found persistently slow now."""
        self.store = store
        self.rank = rank
        self.run_dir = run_dir
        self.last_checkpoint = last_checkpoint
        self.stragglers = stragglers
        self.record: dict | None = None  # None until this rank first leads
        self._base = {"mode": mode, "steps": steps, "prometheus_addr": prometheus_addr}
        self._members_of = -1  # generation whose member records are in the record
        self._step_s: float | None = None  # EWMA
        self._recovered: Recovery | None = None  # its event is made at its first commit
        self._plan_kind = "initial"

    # ---- hooks ---------------------------------------------------------------------------
    def on_recovered(self, recovery: Recovery) -> None:
        d = recovery.decision
        if self.rank != min(d.members):
            return
        rec = self._take_record()
        self._plan_kind = d.chosen.kind
        cause = self._cause(recovery.generation, d.interrupted)
        rec["recoveries"] = (rec["recoveries"] + [{
            "generation": recovery.generation, "time": d.decided_at, "cause": cause,
            "chosen": d.chosen.kind, "ranks_lost": d.ranks_lost, "newcomers": d.newcomers,
            "step": d.committed_step + 1, "mttr_s": None, "detect_s": None, "phases": None,
        }])[-RECENT_RECOVERIES:]
        _count(rec["recovery_counts"], d.chosen.kind, cause)
        rec["last_recovery"] = rec["recoveries"][-1]
        self._recovered = recovery
        self._step_s = None  # the old plan's rate says nothing about the new one
        self._update(rec, recovery.generation, d.members, d.chosen.plan)
        self._publish(rec)

    def on_step_committed(self, c: CommittedStep) -> None:
        if not c.leader:
            return
        rec = self._take_record()
        if self._recovered is not None:
            self._complete_recovery(rec, self._recovered, c.step_s)
            self._recovered = None
        dt = c.step_s
        if dt > 0:
            self._step_s = dt if self._step_s is None else (
                (1 - RATE_ALPHA) * self._step_s + RATE_ALPHA * dt)
        ewma = self._step_s
        rec.update(step=c.step, step_time_s=dt, loss=c.loss,
                   steps_per_s=1 / ewma if ewma else None,
                   samples_per_s=c.plan.global_batch / ewma if ewma else None)
        self._note_checkpoint(rec)
        self._update(rec, c.generation, c.members, c.plan)
        self._publish(rec)

    def on_fit_end(self, result: FitResult) -> None:
        if result.report is None or self.record is None:  # not the leader
            return
        self.record["state"] = "finished"
        self._note_checkpoint(self.record)  # the one written at the end, if any
        self._publish(self.record)
        path = self.run_dir / contract.STATUS_FILE
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)

    # ---- the record ------------------------------------------------------------------------
    def _take_record(self) -> dict:
        """This leader's record; the first time, continued from the predecessor's."""
        if self.record is None:
            old = {}
            if self.store.check([contract.STATUS_RECORD]):
                old = json.loads(self.store.get(contract.STATUS_RECORD))
            self.record = {
                "state": "training", "generation": 0, "members": [], "plan": None,
                "step": None, "steps_per_s": None, "samples_per_s": None, "step_time_s": None,
                "loss": None, "recovery_counts": [], "recoveries": [], "last_recovery": None,
                "stragglers": [], "fenced": [], "checkpoint": None,
                **{k: old[k] for k in ("recovery_counts", "recoveries", "last_recovery",
                                       "fenced", "checkpoint") if k in old},
                **self._base}
        return self.record

    def _update(self, rec: dict, generation: int, members: list[int], plan: Plan) -> None:
        rec.update(time=time.time(), generation=generation, leader=self.rank,
                   stragglers=self.stragglers(),
                   plan={"pipelines": len(plan.pipelines),
                         "stages": [len(p.stages) for p in plan.pipelines],
                         "ranks": len(plan.ranks),
                         "kind": self._plan_kind, "global_batch": plan.global_batch,
                         "num_microbatches": plan.num_microbatches,
                         "microbatch_size": plan.microbatch_size, "schedule": plan.schedule})
        if self._members_of != generation:  # read where each member runs once per generation
            self._members_of = generation
            rec["members"] = [_where(r, raw) for r, raw in zip(members, self._worker_records(
                members))]

    def _note_checkpoint(self, rec: dict) -> None:
        step = self.last_checkpoint()
        if step is not None and (rec["checkpoint"] or {}).get("step") != step:
            rec["checkpoint"] = {"step": step, "time": time.time()}  # seen complete now

    def _worker_records(self, ranks: list[int]) -> list[bytes | None]:
        keys = [contract.worker_key(r) for r in ranks]
        if self.store.check(keys):
            return self.store.multi_get(keys)
        return [self.store.get(k) if self.store.check([k]) else None for k in keys]

    def _complete_recovery(self, rec: dict, recovery: Recovery, first_step_s: float) -> None:
        """MTTR and its phases, now that every member started the new plan."""
        event = recovery_event(self.store, recovery.generation, recovery.decision,
                               first_step_s)
        for entry in rec["recoveries"]:
            if entry["generation"] == recovery.generation:
                entry.update(mttr_s=event["mttr_s"], detect_s=event["detected_after_s"],
                             phases=event["phases"])
        lost = [r for e in rec["recoveries"] for r in e["ranks_lost"]
                if r not in rec["fenced"]]
        rec["fenced"] = sorted(set(rec["fenced"]) | {
            r for r in lost if self.store.check([contract.fenced_key(r)])})

    def _cause(self, generation: int, interrupted: int) -> str:
        """The kind of the notice that started this recovery (failure, join, ...)."""
        for g in range(generation - 1 - interrupted, generation):
            key = contract.notice_key(g)
            if self.store.check([key]):
                return json.loads(self.store.get(key)).get("kind", "failure")
        return "failure"

    def _publish(self, rec: dict) -> None:
        self.store.set(contract.STATUS_RECORD, json.dumps(rec, separators=(",", ":")))


def _where(rank: int, raw: bytes | None) -> dict:
    """{rank, node, host} from the launcher's spawn record (None outside `odyssey run`)."""
    spawn = json.loads(raw) if raw else {}
    return {"rank": rank, "node": spawn.get("node"), "host": spawn.get("host")}


def _count(counts: list[dict], kind: str, cause: str) -> None:
    for c in counts:
        if c["kind"] == kind and c["cause"] == cause:
            c["count"] += 1
            return
    counts.append({"kind": kind, "cause": cause, "count": 1})

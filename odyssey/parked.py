"""Parked stragglers: a slow rank out of the plan but still in the job.

Straggler mitigation may *park* a slow rank (`planner.mitigation`, kind ``park``): the
leader writes the rank's park record (`contract.parked_key`) before it asks for the
re-plan, so when the re-plan's notice aborts the step every member agrees on the next
generation without it (`odyssey.membership.agree` neither expects nor admits a parked
rank) and the survivors run the reroute plan: its pipeline sends its microbatches
through the other pipelines' holders of its layers. The parked rank itself leaves its
generation (`Parked` out of `Coordinator.recover`) and runs a `SpeedProbe`: one forward
and backward of its old stage every `StragglerConfig.probe_every_s`, under the same
injected slowdown its steps had, per layer and microbatch as votes time it, judged by the
same `planner.straggler.StragglerDetector` against the full-speed time the leader parked
it with (its replicas' time in the step it was found, else its own over its factor), as
if that were a replica's. Once that clears it, the rank deletes its record and rejoins
like a replacement worker: the next generation's decision is an ordinary recovery with
a newcomer, which takes its layers from live holders (its own copies are stale). Who is
parked lives in the store only (`parked_now`, `take_back_record`), so a leader that took
over from the one that parked a rank lists it and records its return.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import torch.distributed as dist

from odyssey import contract
from odyssey.engine import Engine
from odyssey.inject import FaultInjector
from odyssey.membership import ever_parked
from planner.program import Op
from planner.straggler import StragglerConfig, StragglerDetector


class Parked(Exception):
    """This rank was parked: it left its generation and must probe, then rejoin."""

    def __init__(self, record: dict):
        super().__init__(f"parked: {record.get('reason', '')}")
        self.record = record


def announce(store: dist.Store, rank: int, record: dict) -> None:
    """Leader: park `rank` (before the re-plan's notice, so every agreement sees it)."""
    store.set(contract.parked_key(rank), json.dumps({"rank": rank, "time": time.time(),
                                                     **record}))
    k = store.add(contract.PARKED_COUNT, 1)
    store.set(contract.parked_note_key(k), str(rank))


def _json_at(store: dist.Store, key: str) -> dict | None:
    """The record at `key`, None when there is none (checked first: a get of a missing
    key waits for the store's timeout)."""
    return json.loads(store.get(key)) if store.check([key]) else None


def record_of(store: dist.Store, rank: int) -> dict | None:
    """`rank`'s park record, None when it is not parked."""
    return _json_at(store, contract.parked_key(rank))


def unpark(store: dist.Store, rank: int, record: dict, factor: float, probes: int) -> None:
    """The parked rank, before it asks to rejoin: what its probe found (for the leader's
    ``straggler_cleared`` event), then membership admits it again."""
    store.set(contract.unparked_key(rank), json.dumps(
        {"rank": rank, "factor": factor, "probes": probes, "parked_step": record["step"],
         "time": time.time(), "park": record}))
    store.delete_key(contract.parked_key(rank))


def parked_now(store: dist.Store) -> list[dict]:
    """The park records of the ranks parked now, by rank; one its probe cleared that
    the leader has not taken back yet (the join's generation is still to come) has
    ``rejoining: True``. The store is the one record of them: a leader that took over
    from one that parked a rank reads them too."""
    out = []
    for r in sorted(ever_parked(store)):
        if store.check([contract.exit_key(r)]):
            continue  # a parked rank that died (its launcher's exit record) is gone
        # the rejoin request first: `unpark` writes it before deleting the park record,
        # and only the leader (the caller) deletes it
        if (back := _json_at(store, contract.unparked_key(r))) is not None:
            out.append({**back["park"], "rejoining": True})
        elif (rec := record_of(store, r)) is not None:
            out.append(rec)
    return out


def take_back_record(store: dist.Store, rank: int) -> dict | None:
    """Leader: what `unpark` wrote for `rank`, back among a decision's newcomers, once
    (the key is deleted: a later replacement of that rank is no parked rank); None when
    `rank` is no parked rank back."""
    key = contract.unparked_key(rank)
    if (back := _json_at(store, key)) is not None:
        store.delete_key(key)
    return back


def job_step(store: dist.Store) -> int | None:
    """The step the job is at, from the leader's live status record (None: unknown)."""
    if not store.check([contract.STATUS_RECORD]):
        return None
    return json.loads(store.get(contract.STATUS_RECORD)).get("step")


def probe_once(engine: Engine, faults: FaultInjector, step: int) -> float:
    """One probe of this rank's speed at the job's `step` (its injected slowdowns apply
    as they would to that step's compute): seconds per layer and microbatch, the fastest
    of three (alone, a probe is preempted by the training beside it more than a step's
    microbatches, which average it out)."""
    best = float("inf")
    with faults.slowed(step):
        for _ in range(3):
            t0 = time.perf_counter()
            seconds = engine.probe()
            faults.after_op(step, Op.FORWARD, seconds)
            best = min(best, time.perf_counter() - t0)
    return best / max(1, len(engine.stage_layers))


class SpeedProbe:
    """A parked rank's watch on its own speed; see the module docstring."""

    def __init__(self, cfg: StragglerConfig, rank: int, factor: float, reference_s: float,
                 probe: Callable[[int], float], done: Callable[[], bool],
                 step: Callable[[], int | None]):
        """`factor`: the slowdown it was parked at; `reference_s`: per layer and microbatch
        forward + backward seconds at full speed; `probe(step)`: the same, measured now,
        at the job's `step`; `done()`: the job finished; `step()`: the job's step now."""
        self.cfg = cfg
        self.rank = rank
        self.reference_s = reference_s
        # a probe alone is timed less exactly than a step's microbatches: cleared below
        # the bar of a factor carried into a baseline (still under the threshold); no
        # warm-up (that is for a generation's first steps): `window` probes judge it
        bar = min(cfg.clear_threshold * cfg.carried_tolerance, cfg.threshold / 1.1)
        self.detector = StragglerDetector(dataclasses.replace(
            cfg, clear_threshold=max(cfg.clear_threshold, bar), warmup_steps=0))
        self.detector.assume({rank: factor})
        self.probe = probe
        self.done = done
        self.step = step
        self.probes = 0

    def wait_until_fast(self) -> float | None:
        """Probe until the rank is no longer slow: its factor then, or None when the job
        finished first."""
        last_step = 0
        while not self.done():
            step = self.step()
            last_step = step if step is not None else last_step
            seconds = self.probe(last_step)
            # the reference as a replica of the same layers: the factor is probe / reference
            timings = {r: {"start": 0, "end": 1, "fwd_s": t, "bwd_s": 0.0}
                       for r, t in ((self.rank, seconds), (-1, self.reference_s))}
            changes = self.detector.observe(self.probes, timings)
            self.probes += 1
            for change in changes:
                if change.cleared and change.straggler.rank == self.rank:
                    return change.straggler.factor
            time.sleep(self.cfg.probe_every_s)
        return None

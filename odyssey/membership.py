"""Agreement on the next generation's members, in the store.

Survivors register under generation g+1 with their last committed step. The members
are fixed once every previous member has either registered or is known dead (exit
record or fenced), or when the join timeout expires: then the silent ones are fenced
before anyone moves on (fence before you forget). One compare-and-set on
`odyssey/gen{g+1}/members` makes the outcome unique; the leader is its lowest rank.

Where the time goes is recorded for the MTTR report (events.py): each join record says
when its rank reached the agreement point and when it learned of the notice; the rank
that decides adds a trace (when it saw everyone in, how long fencing took, whether the
join timeout fired, how many store polls it made) to the membership record. With the
"notify" control plane the rank whose registration completes the set decides at once;
"poll" (the old design) first waits one store poll.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract
from odyssey.monitor import FailureMonitor


class Fenced(RuntimeError):
    """This rank was left out of the new generation and must exit."""


class JobFinished(RuntimeError):
    """The job completed while this rank was trying to join it."""


class AgreementError(RuntimeError):
    """Survivors disagree on something that the commit protocol should make unique."""


@dataclass
class Membership:
    """The outcome of one agreement."""

    generation: int
    members: list[int]
    committed_step: int
    """Last step every member applied (-1: none yet)."""
    dead: list[int] = field(default_factory=list)
    newcomers: list[int] = field(default_factory=list)
    decided_at: float = 0.0
    trace: dict = field(default_factory=dict)
    """The decider's timing: all_in (wall time it saw every expected rank registered),
    fence_s, timed_out, polls, silent, by."""

    @property
    def leader(self) -> int:
        return self.members[0]

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def pending_newcomers(store: dist.Store) -> list[int]:
    """Ranks that asked to join the job (replacement workers)."""
    n = store.add(contract.NEWCOMERS_COUNT, 0)
    return sorted({int(store.get(contract.newcomer_key(i))) for i in range(n)})


def ever_parked(store: dist.Store) -> set[int]:
    """Every rank straggler mitigation parked in this job (contract.parked_note_key)."""
    n = store.add(contract.PARKED_COUNT, 0)
    return {int(store.get(contract.parked_note_key(k))) for k in range(1, n + 1)}


def parked_ranks(store: dist.Store) -> set[int]:
    """Ranks straggler mitigation parked that have not rejoined (contract.parked_key)."""
    return {r for r in ever_parked(store) if store.check([contract.parked_key(r)])}


def agree(store: dist.Store, monitor: FailureMonitor, generation: int, me: int,
          previous: list[int], committed_step: int) -> Membership:
    """Register `me` for `generation` and return the agreed membership.

    Raises `Fenced` if the others decided without this rank.
    """
    cfg = monitor.cfg
    reached = time.time()
    store.set(contract.join_key(generation, me),
              json.dumps({"rank": me, "committed": committed_step, "time": reached,
                          "noticed": monitor.noticed_at.get(generation - 1)}))
    store.add(contract.joined_count_key(generation), 1)
    deadline = time.monotonic() + cfg.join_timeout_s
    monitor.members = sorted(set(previous) | {me})
    decided = contract.members_key(generation)
    polls = 0
    first = cfg.notify  # notify: the registration that completes the set decides at once
    while True:
        if not first:
            try:  # blocks in the store until someone decides, or 10 ms pass
                store.wait([decided], timedelta(milliseconds=10))
                break
            except dist.DistStoreError:
                pass
        first = False
        polls += 1
        if polls % 10 == 0 and store.check([contract.JOB_STATUS]):
            raise JobFinished(f"the job finished before generation {generation} formed")
        dead = monitor.exited_members()
        if me in dead:
            # A launcher recorded us as gone (our node was declared lost while we were
            # cut off): the others are deciding without us, so we must not join.
            raise Fenced(f"rank {me} has an exit record (its node was declared lost)")
        parked = parked_ranks(store) - {me}  # out of the plan, not failed: not expected
        newcomers = [r for r in pending_newcomers(store) if r not in previous
                     and r not in parked]
        expected = sorted((set(previous) - dead - parked) | set(newcomers) | {me})
        timed_out = time.monotonic() > deadline
        count = store.add(contract.joined_count_key(generation), 0)
        all_in = count >= len(expected) and store.check(
            [contract.join_key(generation, r) for r in expected])
        if all_in or timed_out:
            if store.check([contract.JOB_STATUS]):  # a late newcomer must not start over
                raise JobFinished(f"the job finished before generation {generation} formed")
            t_all_in = time.time()
            joined = [r for r in expected if store.check([contract.join_key(generation, r)])]
            silent = sorted(set(expected) - set(joined))
            for r in silent:
                monitor.fence(r, f"did not join generation {generation}")
            wait_fenced(monitor, silent)
            trace = {"all_in": t_all_in, "fence_s": time.time() - t_all_in,
                     "timed_out": bool(timed_out and not all_in), "polls": polls,
                     "silent": silent, "by": me}
            _propose(store, generation, joined, sorted(set(previous) - set(joined)),
                     [r for r in newcomers if r in joined], trace)
            break
    m = _read(store, generation)
    if me not in m.members:
        raise Fenced(f"rank {me} is not a member of generation {generation} "
                     f"(members {m.members})")
    return m


def wait_fenced(monitor: FailureMonitor, ranks: list[int]) -> bool:
    """Wait up to the fence timeout for `ranks` to be confirmed fenced or exited; whether
    they all were."""
    deadline = time.monotonic() + monitor.cfg.fence_timeout_s
    while ranks and time.monotonic() < deadline:
        ranks = [r for r in ranks if not monitor.fenced_or_exited(r)]
        time.sleep(0.01)
    return not ranks


def _propose(store: dist.Store, generation: int, members: list[int], dead: list[int],
             newcomers: list[int], trace: dict) -> None:
    raw = store.multi_get([contract.join_key(generation, r) for r in members])
    steps = {json.loads(v)["rank"]: json.loads(v)["committed"] for v in raw}
    veterans = {r: s for r, s in steps.items() if r not in newcomers}
    if not veterans:  # nobody holds the state: newcomers alone would train from step 0
        raise AgreementError(f"no member of generation {generation - 1} is left to join "
                             f"(newcomers {sorted(steps)}); the job needs a restart")
    if len(set(veterans.values())) > 1:
        raise AgreementError(f"survivors disagree on the last committed step: {veterans}")
    committed = next(iter(veterans.values())) if veterans else -1
    proposal = Membership(generation, sorted(members), committed, dead, newcomers, time.time(),
                          trace)
    store.compare_set(contract.members_key(generation), "", proposal.to_json())


def _read(store: dist.Store, generation: int) -> Membership:
    return Membership(**json.loads(store.get(contract.members_key(generation))))

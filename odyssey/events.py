"""The recovery event record: what failed, what was chosen, and MTTR by phase.

MTTR runs from the fault (the injector's own timestamp when the fault was injected,
else the launcher's exit record, else the notice) to the moment every survivor starts
executing the new plan's Program. Phases chain on the slowest rank, so they add up to
MTTR exactly: detect (fault -> notice), agree (notice -> membership), plan (membership ->
published decision), rebuild (-> groups built), migrate (-> state moved), first_step
(-> checks passed, every rank starting its first step).
"""

from __future__ import annotations

import json

import torch.distributed as dist

from odyssey import contract
from planner.decision import RecoveryDecision


def _get_json(store: dist.Store, key: str) -> dict | None:
    if store.check([key]):
        return json.loads(store.get(key))
    return None


def fault_time(store: dist.Store, ranks: list[int], fallback: float) -> tuple[float, str]:
    """Earliest evidence of the fault among `ranks`: (time, source)."""
    times = []
    for r in ranks:
        inj = _get_json(store, contract.injected_key(r))
        if inj is not None:
            times.append((inj["time"], "injected"))
            continue
        ex = _get_json(store, contract.exit_key(r))
        if ex is not None:
            times.append((ex["time"], "exit record"))
    return min(times) if times else (fallback, "notice")


def recovery_event(store: dist.Store, generation: int, decision: RecoveryDecision,
                   first_step_s: float) -> dict:
    """Assemble the event of the recovery that created `generation` (leader only)."""
    notice = None
    for g in range(generation - 1, -1, -1):  # the notice that started this recovery
        notice = _get_json(store, contract.notice_key(g))
        if notice is not None:
            break
    notice = notice or {"time": decision.agreed_at, "reason": "?", "kind": "?"}
    lost = decision.ranks_lost
    # the first notice of this recovery (an interrupted recovery adds later ones)
    for g in range(generation - 1 - decision.interrupted, generation):
        first = _get_json(store, contract.notice_key(g))
        if first is not None:
            notice = first
            break
    t_fault, source = fault_time(store, lost, notice["time"])
    timelines = [json.loads(v) for v in store.multi_get(
        [contract.started_key(generation, r) for r in decision.members])]
    rebuilt = max(t["rebuilt"] for t in timelines)
    migrated = max(t["migrated"] for t in timelines)
    started = max(t["started"] for t in timelines)
    chosen = decision.chosen
    phases = {
        "detect": notice["time"] - t_fault,
        "agree": decision.agreed_at - notice["time"],
        "plan": decision.decided_at - decision.agreed_at,
        "rebuild": rebuilt - decision.decided_at,
        "migrate": migrated - rebuilt,
        "first_step": started - migrated,
    }
    injected = [_get_json(store, contract.injected_key(r)) for r in lost]
    return {
        "kind": "recovery",
        "generation": generation,
        "cause": notice.get("kind", "failure"),
        "reason": notice.get("reason"),
        "ranks_lost": lost,
        "newcomers": decision.newcomers,
        "members": decision.members,
        "step": decision.committed_step + 1,
        "phase": next((i["spec"]["phase"] for i in injected if i), None),
        "fault_time_source": source,
        "detected_after_s": phases["detect"],
        "candidates": decision.candidates,
        "dropped": decision.dropped,
        "policy": decision.policy,
        "chosen": chosen.kind,
        "chosen_note": chosen.note,
        "plan": chosen.plan.to_dict(),
        "resume_step": chosen.resume_step,
        "lost_steps": chosen.lost_steps,
        "moved_bytes": sum(t.nbytes for t in chosen.transfers),
        "predicted_transition_s": chosen.predicted_transition_s,
        "predicted_step_s": chosen.predicted_step_s,
        "mttr_s": started - t_fault,
        "phases": phases,
        "redone_step_s": first_step_s,
        "interrupted_recoveries": decision.interrupted,
    }

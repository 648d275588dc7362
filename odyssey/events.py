"""The recovery event record: what failed, what was chosen, and MTTR by phase.

MTTR runs from the fault (the injector's own timestamp when the fault was injected,
else the launcher's exit record, else the notice) to the moment every survivor starts
executing the new plan's Program. Phases chain on the slowest rank, so they add up to
MTTR exactly: detect (fault -> notice), agree (notice -> membership), plan (membership ->
published decision), rebuild (-> groups built), migrate (-> state moved), first_step
(-> checks passed, every rank starting its first step).

`subphases` splits detect and agree (chained on the slowest rank too, so the agree.*
parts add up to agree): agree.learn (notice -> the last survivor's monitor saw it),
agree.reach (-> the last survivor reached the agreement point: it finished the op it was
in and unwound), agree.register (-> the decider saw every expected rank registered:
store round trips and poll latency, and the wait for a dead rank's exit record),
agree.join_timeout (the same wait when it ended by the join timeout instead), agree.fence
(waiting for launchers to confirm fences), agree.propose (reading the join records and
the compare-and-set). detect.exit_record is fault -> the launcher's exit record (how fast
the launcher reaped the process), beside detect.notice (= detect).
"""

from __future__ import annotations

import json

import torch.distributed as dist

from odyssey import contract
from planner.decision import SWITCH, RecoveryDecision


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
    if decision.policy == SWITCH:  # no notice: the members left at a step boundary
        notice = _get_json(store, contract.switch_key(generation - 1)) or notice
        joins = [json.loads(v) for v in store.multi_get(
            [contract.join_key(generation, r) for r in decision.members])]
        notice = {**notice, "time": min(j["time"] for j in joins)}
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
    subphases = _subphases(store, generation, decision, notice["time"], t_fault, lost)
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
        # what the prediction covers, measured: groups rebuilt and state moved (or loaded)
        "measured_transition_s": phases["rebuild"] + phases["migrate"],
        "transfer_rounds": len({t.round for t in chosen.transfers}),
        "predicted_step_s": chosen.predicted_step_s,
        "mttr_s": started - t_fault,
        "phases": phases,
        "subphases": subphases,
        "notice_by": notice.get("by"),
        "agree_trace": (_get_json(store, contract.members_key(generation)) or {}).get("trace"),
        "redone_step_s": first_step_s,
        "interrupted_recoveries": decision.interrupted,
        "swap_host_Bps": decision.swap_host_Bps,
        **_two_phase(store, generation, decision, timelines),
    }


def _two_phase(store: dist.Store, generation: int, decision: RecoveryDecision,
               timelines: list[dict]) -> dict:
    """A two-phase recovery's second phase (what it copies behind, predicted), or a
    switch's background copy, measured against the prediction of the phase it ends."""
    chosen = decision.chosen
    if chosen.then is not None:
        then = chosen.then
        return {"two_phase": {"then": then.kind, "then_note": then.note,
                              "then_pipelines": [len(p.stages) for p in then.plan.pipelines],
                              "then_predicted_step_s": then.predicted_step_s,
                              "background_moved_bytes": sum(t.nbytes for t in then.transfers),
                              "predicted_background_s": chosen.background_s}}
    began = [t["background_started"] for t in timelines if t.get("background_started")]
    if not began:
        return {}
    copied = [t["background_copied"] for t in timelines if t.get("background_copied")]
    prev = _get_json(store, contract.plan_key(generation - 1)) or {}
    return {"background": {
        "started": min(began), "measured_s": max(copied) - min(began) if copied else None,
        "predicted_s": prev.get("chosen", {}).get("background_s"),
        "steps": decision.committed_step + 1 - prev.get("chosen", {}).get("resume_step", 0)}}


def _subphases(store: dist.Store, generation: int, decision: RecoveryDecision,
               t_notice: float, t_fault: float, lost: list[int]) -> dict:
    """detect.* and agree.* parts (seconds) from the join records and the decider's
    trace; see the module docstring."""
    out: dict[str, float] = {"detect.notice": t_notice - t_fault}
    exits = [e["time"] for e in (_get_json(store, contract.exit_key(r)) for r in lost) if e]
    if exits:
        out["detect.exit_record"] = min(exits) - t_fault
    members = _get_json(store, contract.members_key(generation)) or {}
    trace = members.get("trace") or {}
    veterans = [r for r in decision.members if r not in decision.newcomers]
    joins = [json.loads(v) for v in store.multi_get(
        [contract.join_key(generation, r) for r in veterans])] if veterans else []
    if not joins or "all_in" not in trace:
        return out  # an older writer: no trace
    noticed = max([t_notice] + [j["noticed"] for j in joins if j.get("noticed")])
    reached = max([noticed] + [j["time"] for j in joins])
    all_in = max(reached, trace["all_in"])
    fenced = all_in + trace["fence_s"]
    wait = "agree.join_timeout" if trace["timed_out"] else "agree.register"
    out.update({"agree.learn": noticed - t_notice, "agree.reach": reached - noticed,
                wait: all_in - reached, "agree.fence": trace["fence_s"],
                "agree.propose": decision.agreed_at - fenced})
    return out

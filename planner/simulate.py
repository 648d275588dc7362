"""Simulate a `Program` or a whole `Plan`: the event simulator's entry points.

`simulate(program, cost)` runs any program in simulated time (`planner.event_loop`);
`simulate_plan(plan, cost)` simulates a plan, by default through its reduced program
(`planner.reduce`: one representative per class of identical pipelines, long steady
states extrapolated). This module sits on top of the cost model, the lowering and the
event loop, so each of those imports only downwards.
"""

from __future__ import annotations

from planner.cost import CostModel
from planner.event_loop import (
    DeadlockError,
    RankBreakdown,
    SimResult,
    SimulationError,
    simulate,
)
from planner.plan import Plan
from planner.program import compile_plan
from planner.reduce import simulate_reduced

__all__ = ["DeadlockError", "RankBreakdown", "SimResult", "SimulationError", "simulate",
           "simulate_plan"]


def simulate_plan(plan: Plan, cost: CostModel, reduce: bool = True) -> SimResult:
    """Simulate `plan`; with `reduce`, identical pipelines are simulated once.

    Pipelines with the same layer partition, microbatch count and hop link classes run
    identically, so one representative per class is simulated (all-reduces costed with
    their full member lists) and its ranks' results are copied; long steady states are
    extrapolated after an exactness check (`planner.reduce`).
    """
    if not reduce:
        return simulate(compile_plan(plan), cost)
    return simulate_reduced(plan, cost)

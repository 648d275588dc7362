"""Plans, Programs, cost model and plan search. Runs without a process group or GPU."""

from planner.plan import Pipeline, Plan, PlanError, Stage, even_partition
from planner.program import Channel, Instruction, Op, Program, compile_plan

__all__ = [
    "Channel", "Instruction", "Op", "Pipeline", "Plan", "PlanError", "Program", "Stage",
    "compile_plan", "even_partition",
]

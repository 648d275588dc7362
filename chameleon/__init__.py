"""Chameleon: eager-mode activation swapping with an online profiler.

    with chameleon.swap(model, budget="6GiB"):
        loss = model(batch); loss.backward()

Engine integration: `SwapManager(model, SwapConfig(...))` and `step_context()` /
`run_step(fn)`. See docs/chameleon.md.
"""

from chameleon.config import SwapConfig
from chameleon.manager import StepReport, SwapManager, is_oom, manager_for, swap
from chameleon.residency import copy_bandwidth
from planner.swap_policy import Action, BudgetError, Policy, PolicyConfig, generate_policy
from profiler.units import format_size, parse_size

__all__ = [
    "Action", "BudgetError", "Policy", "PolicyConfig", "StepReport", "SwapConfig",
    "SwapManager", "copy_bandwidth", "format_size", "generate_policy", "is_oom", "manager_for",
    "parse_size", "swap",
]

"""A plan's swap budget turns Chameleon on for that plan only (`Engine.set_swap_budget`
before `install`), and an always-on swap config is capped by a lower plan budget."""

import torch

from chameleon import SwapConfig
from odyssey.data import Sampler
from odyssey.engine import Engine
from planner.plan import Plan
from tests.helpers import tiny_model


def engine() -> tuple[Engine, Plan]:
    model, data = tiny_model()
    sampler = Sampler(4, 2)
    return Engine(model, data, sampler, 0, device=torch.device("cpu")), Plan.uniform(
        model.num_layers, 1, 2, 4, 2)


def test_a_plan_budget_turns_swapping_on_for_that_plan_and_off_for_one_that_fits():
    eng, plan = engine()
    program = eng.compile(plan)
    eng.swap_to_fit(SwapConfig(min_swap_bytes=0, calibrate_bytes=0))
    eng.install(program, None, None)
    assert eng.swap_report() is None  # the first plan fits: no Chameleon
    eng.set_swap_budget(123456)
    eng.install(program, None, None)
    rep = eng.swap_report()
    assert rep is not None and rep["budget"] == 123456 and rep["plan_budget"] == 123456
    eng.set_swap_budget(None)  # the next plan fits again
    eng.install(program, None, None)
    assert eng.swap_report() is None


def test_an_always_on_budget_is_capped_by_a_lower_plan_budget_only():
    eng, plan = engine()
    program = eng.compile(plan)
    eng.enable_swap(SwapConfig(budget=100_000, calibrate_bytes=0))
    eng.set_swap_budget(50_000)
    eng.install(program, None, None)
    assert eng.swap_report()["budget"] == 50_000
    eng.set_swap_budget(1 << 30)  # a plan budget above the user's: the user's stands
    eng.install(program, None, None)
    assert eng.swap_report()["budget"] == 100_000
    eng.set_swap_budget(None)
    eng.install(program, None, None)
    assert eng.swap_report()["budget"] == 100_000

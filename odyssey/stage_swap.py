"""Chameleon over one rank's pipeline stage: which swap settings apply under the running
plan (always on, or only where a plan gives the rank a budget to fit in), the manager
over the stage's layers, and what the rank reports of it in its commit vote."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace

import torch
from torch import nn

from chameleon import SwapConfig, SwapManager, copy_bandwidth


class StageSwap:
    """Chameleon's settings and manager for the stage this rank runs."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._always: SwapConfig | None = None  # the job's swap settings (always on)
        self._template: SwapConfig | None = None  # settings for a plan's budget (to fit)
        self._budget: int | None = None  # the running plan's budget for this rank
        self._manager: SwapManager | None = None
        self._stage: nn.ModuleList | None = None  # keeps the manager's module alive

    def enable(self, cfg: SwapConfig) -> None:
        """Swap always, as `cfg` says (from the next `install`)."""
        self._always = cfg

    def to_fit(self, template: SwapConfig) -> None:
        """Swap with `template`'s settings where a plan gives this rank a budget."""
        self._template = template

    def set_budget(self, budget_bytes: float | None) -> None:
        """Saved-activation bytes the next plan lets this rank keep resident (None: it
        fits without swapping)."""
        self._budget = None if budget_bytes is None else max(1, int(budget_bytes))

    def host_copy_Bps(self) -> float | None:
        """Copy bandwidth to host memory and back (harmonic mean of the two directions)
        as Chameleon's lanes achieve it here with the `to_fit` settings; None without
        them."""
        if self._template is None:
            return None
        bw = copy_bandwidth(self._template, self._device)
        if not bw:
            return None
        return len(bw) / sum(1.0 / v for v in bw.values())

    def _effective(self) -> SwapConfig | None:
        """The always-on settings (within the plan's budget when that is lower), else the
        template at the plan's budget, else None."""
        budget = self._budget
        if self._always is not None:
            if budget is not None and budget < self._always.budget_bytes():
                return replace(self._always, budget=budget)
            return self._always
        if budget is not None and self._template is not None:
            return replace(self._template, budget=budget)
        return None

    def install(self, layers: list[nn.Module]) -> None:
        """(Re)create the manager over the stage's `layers` (they changed), or close it
        when the new plan needs no swapping."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        cfg = self._effective()
        if cfg is None:
            return
        self._stage = nn.ModuleList(layers)
        self._manager = SwapManager(self._stage, replace(cfg, layers=layers), self._device)

    @property
    def on(self) -> bool:
        """Whether Chameleon swaps this stage under the running plan."""
        return self._manager is not None

    def step_context(self) -> AbstractContextManager:
        """The manager's context for one training step (only while `on`)."""
        assert self._manager is not None
        return self._manager.step_context()

    def vote(self) -> dict | None:
        """What the commit vote carries: resident peak against the budget and the copy
        bandwidth measured (None while off)."""
        if self._manager is None:
            return None
        return {"budget": self._manager.work_budget,
                "peak": self._manager.executor.stats.peak_resident,
                "copy_Bps": self._manager.copy_Bps()}

    def report(self) -> dict | None:
        """Chameleon's report (None while off), and the plan's budget that turned it on."""
        if self._manager is None:
            return None
        return {**self._manager.report(), "plan_budget": self._budget}

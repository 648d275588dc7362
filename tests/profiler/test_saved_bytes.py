"""The saved-bytes meter counts what Chameleon budgets: each saved storage once, per
layer and microbatch, parameters excluded, numerics untouched."""

import torch
from torch import nn

from chameleon import SwapConfig, SwapManager
from profiler.op_monitor import param_storages
from profiler.saved_bytes import SavedBytesMeter


def layers() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(3)])


def forward(model: nn.ModuleList, x: torch.Tensor, meter: SavedBytesMeter | None = None):
    if meter is not None:
        meter.start()
    for i, layer in enumerate(model):
        x = layer(x)
        if meter is not None:
            meter.mark(i)
    return x.sum()


def test_meter_counts_per_layer_what_chameleon_counts_and_changes_nothing():
    model, meter = layers(), SavedBytesMeter()
    xs = [torch.randn(8, 64, requires_grad=True) for _ in range(2)]
    with meter.step(param_storages(model)):
        loss = sum(forward(model, x, meter) for x in xs)
    loss.backward()
    per = meter.per_microbatch(range(3))
    # layer 0 saves its input and its tanh output (8 x 64 fp32 each); later layers' inputs
    # are the previous tanh output (one storage, counted once), so each adds its output
    assert per == [2 * 8 * 64 * 4, 8 * 64 * 4, 8 * 64 * 4]
    grads = [p.grad.clone() for p in model.parameters()]

    ref = layers()
    mgr = SwapManager(ref, SwapConfig(budget="1GiB", calibrate_bytes=0))
    with mgr.step_context():
        loss = sum(forward(ref, x.detach().requires_grad_(True)) for x in xs)
        loss.backward()
    assert mgr.last.stats.saved_bytes == 2 * sum(per)  # two microbatches
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, ref.parameters()))
    mgr.close()


def test_a_layer_without_a_forward_this_step_reports_nothing():
    model, meter = layers(), SavedBytesMeter()
    with meter.step(param_storages(model)):
        forward(model[:2], torch.randn(4, 64, requires_grad=True), meter)
    assert meter.per_microbatch(range(2)) is not None
    assert meter.per_microbatch(range(3)) is None

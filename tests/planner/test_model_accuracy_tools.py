"""What benchmarks/model_accuracy.py measures with: Kendall's tau, MAPE (planner.accuracy),
the median calibration window (planner.calibrate) and the memory accounting
(profiler.memory_probe: saved-tensor hooks, optimizer state; odyssey.testing.memory: a
whole run with ranks as threads) on tiny known cases."""

import gc
import math
import tempfile

import pytest
import torch
from torch import nn

from odyssey.testing.memory import measure_memory
from planner.accuracy import kendall_tau, mape, max_ape, rel_errors
from planner.calibrate import Calibration, CalibrationConfig
from profiler.memory_probe import MemoryProbe, optimizer_state_bytes, unique_storage_bytes


def test_kendall_tau_orders_and_ties():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair out of 6: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in x: pairs (1,2) tied in x; C=5, D=0, ties_x=1, ties_y=0
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(6 * 5))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_mape_max_and_signed_errors():
    pred, meas = [1.1, 0.9, 2.0], [1.0, 1.0, 2.0]
    assert rel_errors(pred, meas) == pytest.approx([0.1, -0.1, 0.0])
    assert mape(pred, meas) == pytest.approx(0.2 / 3)
    assert max_ape(pred, meas) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mape([1.0], [0.0])


def test_median_calibration_ignores_one_burst_and_tracks_drift():
    st = Calibration(CalibrationConfig(estimator="median", window=3))
    for f in (1.05, 1.30, 1.06):  # one burst
        st.observe("forward", 1.0, f)
    assert st.factors() == {"forward": 1.06}
    for f in (1.10, 1.12):  # the machine got slower
        st.observe("forward", 1.0, f)
    assert st.factors()["forward"] == pytest.approx(1.10)  # median of the last three


def _layer(dim: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.Tanh())


def test_probe_counts_saved_inputs_and_outputs_not_parameters():
    probe = MemoryProbe()
    layer = probe.watch_layer(_layer())
    y = layer(torch.randn(2, 8, requires_grad=True))
    # linear saves its input (64 B; the weight is a parameter), tanh its output (64 B,
    # also the tracked layer output: one storage)
    assert probe.activation_bytes() == 2 * 2 * 8 * 4
    y.sum().backward()
    del y
    gc.collect()
    assert probe.activation_bytes() == 0  # released by backward
    assert probe.peaks[-1]["activations"] == 128


def test_probe_counts_a_storage_shared_by_two_layers_once():
    probe = MemoryProbe()
    a, b = probe.watch_layer(_layer(4)), probe.watch_layer(_layer(4))
    y = b(a(torch.randn(1, 4, requires_grad=True)))
    # x, tanh_a(out) (= b's saved input), tanh_b(out): 3 storages of 16 B, not 4
    assert probe.activation_bytes() == 3 * 16
    # and views of one storage count once
    base = torch.zeros(10)
    assert unique_storage_bytes([base[:5], base[5:], base]) == 40
    del y


def test_optimizer_state_bytes_adamw():
    layer = nn.Linear(8, 8, bias=False)
    opt = torch.optim.AdamW(layer.parameters())
    assert optimizer_state_bytes(opt) == 0  # lazily created
    layer(torch.randn(2, 8)).sum().backward()
    opt.step()
    # exp_avg + exp_avg_sq (fp32, 64 elements each) + a scalar fp32 step
    assert optimizer_state_bytes(opt) == 2 * 64 * 4 + 4


def test_measure_memory_of_a_two_layer_emulated_model():
    from odyssey.data import RandomRegression
    from odyssey.emulate import EmulationConfig, build_emulated
    from odyssey.job_config import job_config

    dim, mb = 4, 1
    emu = EmulationConfig(num_layers=2, forward_ms=0.0, backward_ms=0.0, dim=dim)
    cfg = job_config(dp=1, pp=1, num_microbatches=1, microbatch_size=mb, mode="emulated",
                     log_every=1000, resume=False)
    with tempfile.TemporaryDirectory() as d:
        cfg = job_config(cfg, run_dir=d)
        got = measure_memory(build_emulated(emu), RandomRegression(dim=dim), cfg, 1,
                             steps=2, timeout_s=60)[0]
    params = 2 * (dim * dim + dim) * 4
    assert got["params"] == params and got["grads"] == params
    assert got["optimizer"] == 2 * params + 2 * 2 * 4  # two moments + 4 scalar steps
    # input x, tanh outputs of both layers, the loss's saved (out - target): 4 x [1, 4]
    assert got["activations"] == 4 * mb * dim * 4
    assert got["categories_total"] == params * 4 + 16 + 64
    assert got["peak_total"] <= got["categories_total"]

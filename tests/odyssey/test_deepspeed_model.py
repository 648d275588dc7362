"""A DeepSpeed pipeline model trains under Odyssey exactly as under DeepSpeed's engine.

The model of examples/train_ds_pipe.py (a `LayerSpec` list whose boundaries change shape,
with a parameterless GELU layer) and one DeepSpeed JSON config train 6 steps twice: under
DeepSpeed's own `PipelineEngine` (2 processes under torchrun, CPU, gloo, torch AdamW) and
under Odyssey (2 ranks as threads, real gloo groups), same seed, same samples in the same
order. Final parameters must be bitwise equal and per-step losses equal to float32
rounding (2 ulps; see the test). The contract checks need deepspeed's classes but no
DeepSpeed run; the JSON config checks are in tests/odyssey/test_ds_config.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from odyssey.data import Sampler
from odyssey.deepspeed_model import DeepSpeedModelError, from_deepspeed
from odyssey.engine import OptimizerConfig
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from odyssey.testing.reference import reference_run
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.conftest import ROOT
from tests.helpers import DS_CONFIG
from tests.helpers import run_odyssey as launch_job

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed")

from examples.train_ds_pipe import PipeConfig, build, lm_loss, pipe_layers  # noqa: E402

TINY = PipeConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=1)
STEPS = 6
CONFIG = DS_CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(tmp_path: Path, config_path: Path, timeout_s: float = 240) -> dict:
    """DeepSpeed's engine, 2 stages, under torchrun; returns its JSON + layer states."""
    out = tmp_path / "ds"
    model_args = ["--pipe-vocab-size", str(TINY.vocab_size), "--pipe-seq-len",
                  str(TINY.seq_len), "--pipe-d-model", str(TINY.d_model), "--pipe-n-heads",
                  str(TINY.n_heads), "--pipe-n-blocks", str(TINY.n_blocks)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), "--max-restarts", "0",
           str(ROOT / "tests" / "workers" / "ds_pipe_engine.py"), "--ds-config",
           str(config_path), "--pp", "2", "--steps", str(STEPS), "--out", str(out),
           *model_args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions")}
    log = tmp_path / "ds.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        finally:
            if proc.poll() is None:  # timed out: our torchrun and its workers only
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 0, log.read_text()[-4000:]
    result = json.loads((out / "deepspeed.json").read_text())
    result["layers"] = {}
    for path in out.glob("layers-rank*.pt"):
        result["layers"].update(torch.load(path))
    return result


def run_odyssey(tmp_path: Path, config_path: Path) -> tuple:
    model, data = build(TINY)
    cfg = job_config(steps=STEPS, pp=2, ds_config=str(config_path), run_dir=str(tmp_path / "o"),
                     log_every=100, progress="off")

    def worker(w):
        t = Trainer(model, data, cfg, w)
        res = t.fit()
        return res, t.cfg, t.engine.held.weights()

    results = run_threads(2, worker, timeout_s=120)
    layers = {i: sd for _, _, st in results for i, sd in st.items()}
    return results[0][0], results[0][1], layers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_losses_and_weights_as_deepspeed_engine(tmp_path):
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(CONFIG))
    ds = run_deepspeed(tmp_path, config_path)
    ody, cfg, layers = run_odyssey(tmp_path, config_path)
    assert ds["parts"] == [0, 3, 6]  # the cut feeds GELU a [mb, t, 2d] tensor
    assert (cfg.training.microbatch_size, cfg.training.num_microbatches) == (2, 4)
    o = [ody.losses[k] for k in range(STEPS)]
    # Same gradients and AdamW updates, bit for bit: DeepSpeed scales each microbatch loss
    # by 1/GAS, Odyssey sums mb x the mean and divides by the global batch -- both exact
    # power-of-two scalings here -- and both accumulate microbatches in the same order.
    assert set(layers) == set(ds["layers"]) | {3}  # GELU (3) has no state on DeepSpeed's side
    for i, sd in ds["layers"].items():
        for k, v in sd.items():
            assert torch.equal(layers[i][k], v), f"layer {i} {k} differs after {STEPS} steps"
    # The reported loss is summed differently (DeepSpeed: float32 tensor adds; Odyssey: a
    # Python float sum of float32 values), so it may differ in the last float32 bit:
    # allow 2 float32 ulps (measured: 0 to 1 ulp, <= 6.8e-8 relative).
    ulp = torch.finfo(torch.float32).eps
    for k, (a, b) in enumerate(zip(o, ds["loss"])):
        assert abs(a - b) <= 2 * ulp * abs(b), f"step {k}: odyssey {a} vs deepspeed {b}"
    assert o[-1] < o[0] - 0.05  # it trains


# ---- the contract, without a DeepSpeed run --------------------------------------------
def test_layer_specs_build_identically_and_infer_boundaries():
    model, data = build(TINY)
    assert model.num_layers == 6
    a, b = model.build_layer(1), model.build_layer(1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    torch.manual_seed(1234 + 1)  # DeepSpeed's seed_layers: base_seed + layer index
    ref = pipe_layers(TINY)[1].build()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), ref.parameters()))
    assert model.boundary_spec(3, 5).shape == (5, TINY.seq_len, 2 * TINY.d_model)
    assert model.boundary_spec(1, 5).shape == (5, TINY.seq_len, TINY.d_model)
    x, y = data.batch([0, 1, 2])
    h = x
    for i in range(model.num_layers):
        h = model.build_layer(i)(h)
    per_sample = model.loss_fn(h, y)
    assert per_sample.shape == (3,) and torch.allclose(per_sample.sum() / 3, lm_loss(h, y))


def test_unsupported_models_fail_clearly():
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    data_x, data_y = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    emb = LayerSpec(nn.Embedding, 8, 4)
    with pytest.raises(DeepSpeedModelError, match="TiedLayerSpec.*'embed'"):
        from_deepspeed([TiedLayerSpec("embed", nn.Embedding, 8, 4), LayerSpec(nn.Linear, 4, 8)],
                       (data_x, data_y), loss_fn=lm_loss)
    with pytest.raises(DeepSpeedModelError, match="needs a loss"):
        from_deepspeed([emb], (data_x, data_y))
    with pytest.raises(DeepSpeedModelError, match="layer 1 returns a tuple"):
        from_deepspeed([emb, lambda h: (h, h), LayerSpec(nn.Linear, 4, 8)], (data_x, data_y),
                       loss_fn=lm_loss)
    with pytest.raises(DeepSpeedModelError, match="input of layer 1 is torch.int64"):
        from_deepspeed([lambda t: t + 1, emb], (data_x, data_y), loss_fn=lm_loss)
    with pytest.raises(DeepSpeedModelError, match="must return a scalar"):
        from_deepspeed([emb, LayerSpec(nn.Linear, 4, 8)], (data_x, data_y),
                       loss_fn=lambda out, y: (out.sum(-1) - y).mean(-1))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_deepspeed_model_recovers_under_odyssey_run(tmp_path):
    """examples/train_ds_pipe.py under `odyssey run`, dp 2 x pp 2, rank 3 (the stage after
    the widening cut) SIGKILLed in backward: a neighbour adopts its layers (the GELU with
    no parameters migrates too) and the losses follow the single-process reference."""
    config = {**CONFIG, "train_batch_size": 16}  # 2 x 4 x dp 2
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    model_args = ["--pipe-vocab-size", str(TINY.vocab_size), "--pipe-seq-len",
                  str(TINY.seq_len), "--pipe-d-model", str(TINY.d_model), "--pipe-n-heads",
                  str(TINY.n_heads), "--pipe-n-blocks", str(TINY.n_blocks)]
    launch_job(4, run_dir, "train_ds_pipe.py",
               ["--dp", "2", "--pp", "2", "--ds-config", str(path), "--steps", "8",
                "--log-every", "100", "--ft-policy", "redundant",
                "--inject", "kill:rank=3,step=3,phase=backward", *model_args],
               ["--finish-grace", "20"])
    report = json.loads((run_dir / "report.json").read_text())
    [event] = [e for e in report["events"] if e["kind"] == "recovery"]
    assert event["chosen"] == "redundant" and event["ranks_lost"] == [3]
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    assert report["replicas_identical"] is True
    model, data = build(TINY)
    ref, _ = reference_run(model, data, Sampler(8, 2), 8, OptimizerConfig(lr=3e-3))
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(losses) == list(range(8))
    worst = max(abs(losses[k] - ref[k]) / ref[k] for k in range(8))
    assert worst <= 1e-5, f"trajectory left the failure-free one: {worst:.2e}"


@pytest.mark.timeout(120)
def test_stage_without_parameters_under_data_parallelism(tmp_path):
    """dp 2 x pp 3 with the middle stage holding only the GELU: its (empty) gradient
    all-reduce and no-op optimizer still give the reference losses."""
    model, data = build(TINY)
    cfg = job_config(steps=4, dp=2, pp=3, partition=(3, 1, 2), num_microbatches=4,
                     microbatch_size=2, run_dir=str(tmp_path), log_every=100, progress="off")
    res = run_threads(6, lambda w: Trainer(model, data, cfg, w).fit(), timeout_s=100)
    ref, _ = reference_run(model, data, Sampler(4, 2), 4, OptimizerConfig(lr=3e-3))
    worst = max(abs(res[0].losses[k] - ref[k]) / ref[k] for k in range(4))
    assert worst <= 1e-5, worst

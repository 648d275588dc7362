"""Device and backend selection: what `--device` resolves to, and the one-line refusal of
`--device cuda` where there is no CUDA (the CPU suite's side of the GPU checks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from odyssey.comm import CommConfig
from odyssey.devices import DeviceError, resolve_backend, resolve_device
from odyssey.job_config import job_config
from tests.conftest import ROOT
from tests.helpers import WORKER_ENV

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve_to_cpu_without_a_gpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_bad_device_and_backend_values_are_refused() -> None:
    with pytest.raises(DeviceError, match="one of"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="needs --device cuda"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="comm.device"):
        CommConfig(device="gpu")
    with pytest.raises(ValueError, match="comm.backend"):
        job_config(device="cpu").comm.__class__(backend="mpi")
    assert job_config(device="cuda").comm.device == "cuda"


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_names_what_is_missing() -> None:
    with pytest.raises(DeviceError, match="--device cuda was asked for but"):
        resolve_device("cuda")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_training_script_with_device_cuda_exits_with_one_line(tmp_path) -> None:
    cmd = [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node", "1",
           "--run-dir", str(tmp_path / "run"), str(ROOT / "examples" / "train_gpt.py"),
           "--device", "cuda", "--steps", "2"]
    env = {**os.environ, **WORKER_ENV}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=100, cwd=ROOT, env=env)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    lines = [ln for ln in text.splitlines() if "--device cuda was asked for" in ln]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text

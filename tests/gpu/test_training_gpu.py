"""Training on a GPU: one GPU against the CPU reference; several ranks sharing one GPU
over gloo through a SIGKILL and in-place recovery; NCCL groups (one GPU at least, a
killed rank when two or more are present). Skipped without CUDA.

Tolerance: the CPU reference and the GPU run use different kernels (summation order in
matmul and softmax reductions; TF32 is off), so per-step losses agree to ~1e-6 relative
per step and drift slowly through training; 1e-4 relative over 14 steps is the bound
these tests hold (the CPU suite keeps 1e-5 CPU-vs-CPU).
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from odyssey.comm import Comm, CommConfig
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from tests.gpu.figures import record
from tests.helpers import max_rel, reference, run_odyssey, run_plan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs CUDA (no GPU visible)")]

STEPS = 14
RTOL = 1e-4
TINY = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2"]
BATCH = ["--num-microbatches", "4", "--microbatch-size", "2"]


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _reference() -> dict[int, float]:
    ref, _ = reference(job_config(steps=STEPS, num_microbatches=4, microbatch_size=2))
    return ref


def _check_run(run_dir, name: str, **figures: object) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(losses) == list(range(STEPS))
    ref = _reference()
    worst = max(max_rel(losses[k], ref[k]) for k in range(STEPS))
    s = report["samples"]
    events = [e for e in report["events"] if e["kind"] == "recovery"]
    record(name, worst_rel_loss_vs_cpu=worst, lost=s["lost"], duplicated=s["duplicated"],
           recoveries=[(e["chosen"], round(e["mttr_s"] * 1e3, 1)) for e in events],
           replicas_identical=report["replicas_identical"], **figures)
    assert worst <= RTOL, f"GPU trajectory left the CPU reference: {worst:.2e}"
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["trained"] == s["expected"]
    assert report["replicas_identical"] is True
    return report


@pytest.mark.timeout(300)
def test_one_gpu_trains_like_the_cpu_reference() -> None:
    cfg = job_config(steps=STEPS, num_microbatches=4, microbatch_size=2, device="cuda")
    t0 = time.perf_counter()
    fit, _ = run_plan(cfg, 1)
    wall = time.perf_counter() - t0
    ref = _reference()
    worst = max(max_rel(fit.losses[k], ref[k]) for k in range(STEPS))
    record("one_gpu_vs_cpu", worst_rel_loss_vs_cpu=worst, steps=STEPS, wall_s=wall)
    assert worst <= RTOL, f"{worst:.2e}"


@pytest.mark.timeout(400)
def test_ranks_sharing_one_gpu_over_gloo_recover_in_place(tmp_path) -> None:
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    run_odyssey(4, run_dir, "train_gpt.py",
                [*TINY, *BATCH, "--steps", str(STEPS), "--dp", "2", "--pp", "2",
                 "--device", "cuda", "--comm.backend", "gloo", "--log-every", "100",
                 "--inject", "kill:rank=3,step=6,phase=backward"],
                ["--finish-grace", "20"], timeout=360)
    report = _check_run(run_dir, "four_ranks_one_gpu_gloo_sigkill",
                        wall_s=time.perf_counter() - t0)
    assert [e["chosen"] for e in report["events"] if e["kind"] == "recovery"]


@pytest.mark.timeout(120)
def test_single_gpu_nccl_group_allreduces_and_aborts() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    comm = Comm(store, 0, 0, CommConfig(device="cuda", backend="nccl", timeout_s=30))
    t = torch.arange(4, dtype=torch.float32, device="cuda")
    pg = comm._new_group("ar-0", (0,))
    comm._groups["ar-0"] = (pg, (0,))
    out = comm.wait(comm.allreduce(t, (0,)))
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.arange(4, dtype=torch.float32))
    t0 = time.perf_counter()
    comm.abort()  # the old generation's communicators go before the next is built
    record("nccl_single_gpu_group", abort_s=time.perf_counter() - t0,
           nccl_version=".".join(map(str, torch.cuda.nccl.version())))


@pytest.mark.timeout(400)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ GPUs for NCCL ranks")
def test_nccl_ranks_on_their_own_gpus_recover_in_place(tmp_path) -> None:
    n = min(4, torch.cuda.device_count())
    dp, pp = (2, 2) if n == 4 else (n, 1)
    run_dir = tmp_path / "run"
    run_odyssey(n, run_dir, "train_gpt.py",
                [*TINY, *BATCH, "--steps", str(STEPS), "--dp", str(dp), "--pp", str(pp),
                 "--device", "cuda", "--log-every", "100",
                 "--inject", f"kill:rank={n - 1},step=6,phase=backward"],
                ["--finish-grace", "20"], timeout=360)
    _check_run(run_dir, f"nccl_{n}_gpus_sigkill", gpus=n)

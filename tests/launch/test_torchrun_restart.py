"""The same training script under plain torchrun: a killed worker restarts the group,
which resumes from its last checkpoint and follows the failure-free trajectory."""

import json
import os
import subprocess
import sys

import pytest

from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from tests.conftest import ROOT
from tests.helpers import max_rel, reference

pytestmark = pytest.mark.slow  # every test here starts a torchrun job


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_torchrun_restart_resumes_from_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.2",
           str(ROOT / "examples" / "train_gpt.py"),
           "--steps", "12", "--dp", "1", "--pp", "2", "--num-microbatches", "4",
           "--microbatch-size", "2", "--checkpoint-every", "4", "--log-every", "4",
           "--inject", "kill:rank=1,step=9,phase=backward", "--run-dir", str(run_dir),
           "--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
           "--gpt-n-heads", "2", "--gpt-n-blocks", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["launcher"] == "torchrun" and report["attempt"] == 1
    # resumed from step 7's checkpoint; or, where the kill came before rank 1 had
    # reported its files of step 7 (a loaded machine), that one is incomplete, skipped
    # with a reason, and the run resumes from step 3's
    kinds = [(e["kind"], e["checkpoint_step"]) for e in report["events"]]
    assert kinds in ([("resume", 7)], [("checkpoint_skipped", 7), ("resume", 3)]), kinds
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(losses) == list(range(12))
    ref, _ = reference(job_config(steps=12, num_microbatches=4, microbatch_size=2))
    assert max(max_rel(losses[k], ref[k]) for k in range(12)) <= 1e-5

"""SIGTERM to the launcher: workers checkpoint the last committed step and exit; the
same command then resumes at the next step with nothing redone."""

import json
import signal
import time

import pytest

from odyssey import checkpoint as ckpt
from odyssey import contract
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from tests.helpers import max_rel, odyssey_in_background, reference, run_odyssey

pytestmark = pytest.mark.slow

STEPS = 150
ARGS = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2", "--num-microbatches", "4",
        "--microbatch-size", "2", "--log-every", "1000", "--dp", "2", "--pp", "2",
        "--steps", str(STEPS)]


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_and_the_same_command_resumes_with_nothing_redone(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_dir / contract.METRICS_FILE
    with odyssey_in_background(4, run_dir, "train_gpt.py", ARGS) as job:
        deadline = time.monotonic() + 150
        while len(read_jsonl(metrics)) < 8:
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "checkpoint the last committed step and stop" in out
    stopped_at = ckpt.latest_step(run_dir / contract.CHECKPOINT_DIR, 4)
    assert stopped_at is not None and stopped_at < STEPS - 1, out[-3000:]
    # every committed step is in the checkpoint: nothing after it was committed
    assert [m["step"] for m in read_jsonl(metrics)] == list(range(stopped_at + 1))
    assert not (run_dir / contract.RUN_LOCK_FILE).exists()

    run_odyssey(4, run_dir, "train_gpt.py", ARGS, ["--finish-grace", "20"], timeout=200)
    steps = [m["step"] for m in read_jsonl(metrics)]
    assert steps == list(range(STEPS))  # each step once: nothing redone, nothing skipped
    ref, _ = reference(job_config(steps=STEPS, num_microbatches=4, microbatch_size=2))
    losses = {m["step"]: m["loss"] for m in read_jsonl(metrics)}
    assert max(max_rel(losses[k], ref[k]) for k in range(STEPS)) <= 1e-5
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    resumes = [e for e in report["events"] if e["kind"] == "resume"]
    assert [e["checkpoint_step"] for e in resumes] == [stopped_at]

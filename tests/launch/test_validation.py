"""Inputs are checked once, in the launcher, before any worker starts: one line, exit 2.
Repeatable flags keep every value (`--inject a --inject b` fires both)."""

import json
import os
import subprocess
import sys

import pytest

from odyssey import contract
from odyssey.report import read_jsonl
from tests.conftest import ROOT
from tests.helpers import WORKER_ENV, run_odyssey

TINY = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2", "--num-microbatches", "4",
        "--microbatch-size", "2", "--log-every", "100"]

BAD_INPUTS = {
    "plan-does-not-fit": (["--dp", "3", "--pp", "2"], "--dp 3 x --pp 2 does not fit"),
    "missing-plan-file": (["--plan-file", "nope.json"], "--plan-file nope.json: no such file"),
    "garbage-plan-file": (["--plan-file", "{bad}"], "not a valid plan"),
    "inject-rank-outside": (["--inject", "kill:rank=9,step=2"], "rank 9 is not in the job"),
    "inject-step-past-end": (["--steps", "6", "--inject", "kill:rank=1,step=6"],
                             "would never fire"),
    "inject-bad-syntax": (["--inject", "kill:rank=1"], "rank= and step= are required"),
    "inject-slow-factor-below-1": (["--inject", "slow:rank=1,step=2,factor=0.5"],
                                   "factor must be >= 1"),
    "inject-slow-until-not-after-step": (["--inject", "slow:rank=1,step=4,factor=2,until=3"],
                                         "until must be > step"),
    "memory-budget-without-swap": (["--memory-budget", "lots"], "swap.budget"),
    "ds-config-missing": (["--ds-config", "nope-ds.json"], "--ds-config nope-ds.json"),
    "unknown-flag": (["--stepz", "3"], "unrecognized arguments: --stepz"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_before_any_worker(tmp_path, name):
    args, needle = BAD_INPUTS[name]
    if "{bad}" in args:
        bad = tmp_path / "plan.json"
        bad.write_text('{"pipelines": 3')
        args = [str(bad) if a == "{bad}" else a for a in args]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node", "4",
         "--run-dir", str(run_dir), str(ROOT / "examples" / "train_gpt.py"), *TINY, *args],
        cwd=tmp_path, env={**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("odyssey run: error: "), proc.stderr
    assert needle in lines[0]
    assert not run_dir.exists()  # refused before the run directory, let alone a worker


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_repeated_inject_flags_fire_every_fault(tmp_path):
    run_dir = tmp_path / "run"
    run_odyssey(4, run_dir, "train_gpt.py", [
        *TINY, "--dp", "2", "--pp", "2", "--steps", "10", "--ft-policy", "reroute",
        "--inject", "kill:rank=3,step=2", "--inject", "kill:rank=2,step=5"],
        ["--finish-grace", "20"])
    fired = sorted(r["spec"]["rank"] for r in read_jsonl(run_dir / contract.FAULTS_FILE))
    assert fired == [2, 3]
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    lost = sorted(r for e in report["events"] if e["kind"] == "recovery"
                  for r in e["ranks_lost"])
    assert lost == [2, 3]
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_same_worker_failure_on_every_rank_is_one_line(tmp_path):
    # the plan's partition needs the model's layer count: only the workers can see it
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node", "2",
         "--run-dir", str(run_dir), str(ROOT / "examples" / "train_gpt.py"), *TINY,
         "--pp", "2", "--partition", "3,5"],
        cwd=ROOT, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True,
        timeout=100)
    assert proc.returncode == 2, proc.stderr[-3000:]
    causes = [line for line in proc.stderr.splitlines() if "failed: PlanError" in line]
    assert len(causes) == 1 and "rank(s) 0,1 failed" in causes[0]
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (run_dir / contract.WORKER_LOG_DIR / "rank0.log").read_text()

"""Helpers shared by the benchmarks: where output goes, launch a training run, read its report.

Output rule (docs/BENCHMARKS.md, "Where results go"): every benchmark writes under
`out_dir()`, i.e. runs/bench/ (git-ignored), unless its `--out` says otherwise;
benchmarks/results/ holds only the small summaries the docs cite, refreshed by passing
`--out` into it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from odyssey import contract

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_gpt.py"
RESULTS = ROOT / "benchmarks" / "results"
"""The committed summaries the docs cite; written only when a benchmark's --out points here."""


def out_dir(*parts: str) -> Path:
    """Default output folder of a benchmark, runs/bench[/parts...] (git-ignored), created.

    Raw output (per-step and per-iteration logs, run directories, plots) always lands
    here by default, so running a benchmark never changes tracked files."""
    path = ROOT.joinpath("runs", "bench", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, run_dir: Path, script_args: list[str], launcher: str = "odyssey",
           timeout_s: float = 600, extra_launcher_args: list[str] = ()) -> dict:
    """Run examples/train_gpt.py on `nproc` local ranks; return its report.json."""
    if launcher == "odyssey":
        cmd = [sys.executable, "-m", "launch.cli", "run", "--standalone",
               "--nproc-per-node", str(nproc), "--run-dir", str(run_dir),
               *extra_launcher_args, str(TRAIN)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.1",
               *extra_launcher_args, str(TRAIN), "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.run(cmd + script_args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads((run_dir / contract.REPORT_FILE).read_text())


def step_times(run_dir: Path, skip: int) -> list[float]:
    """Step times of a run (its metrics.jsonl), the first `skip` dropped."""
    lines = (run_dir / contract.METRICS_FILE).read_text().splitlines()
    return [json.loads(x)["step_time_s"] for x in lines if x.strip()][skip:]


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user+sys) of every thread of this process so far, by thread name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        key = f"{name}[{task.name}]"
        out[key] = (int(fields[11]) + int(fields[12])) / tick
    return out

"""How fast a death is recorded and recovered from: torchrun path vs Ray backend.

The same real-compute job (tiny GPT, 4 ranks as 4 data-parallel pipelines) runs under
`odyssey run` and `odyssey run --backend ray`. Once the job has committed 20, 60 and 100 steps
the benchmark SIGKILLs rank 3, then 2, then 1: the worker process on the torchrun path,
the worker's Ray actor process on the Ray path. Per kill it reports

* record latency: the launcher's exit-record time minus the kill time (how long until
  survivors can learn of the death from the store),
* MTTR and its detect phase, from report.json (MTTR runs from the launcher's exit
  record; a survivor that sees the broken connection first makes detect negative),
* kill -> resume: record latency + MTTR, the time from the kill until every survivor runs
  the new plan.

    python benchmarks/ray_actor_death.py            # writes runs/bench/ray_actor_death.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import out_dir  # noqa: E402

TINY = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2"]
# (rank to kill, kill once this many steps are committed)
KILLS = [(3, 20), (2, 60), (1, 100)]
STEPS = 150


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


def run_once(backend: str, work: Path) -> dict:
    run_dir = work / backend
    extra = ["--backend", "ray", "--ray-temp-dir", str(work / "ray")] if backend == "ray" \
        else ["--standalone"]
    cmd = [sys.executable, "-m", "launch.cli", "run", *extra, "--nproc-per-node", "4",
           "--run-dir", str(run_dir), "--finish-grace", "20",
           str(ROOT / "examples" / "train_gpt.py"), "--log-every", "100", "--dp", "4",
           "--steps", str(STEPS), "--num-microbatches", "4", "--microbatch-size", "2", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed: dict[int, float] = {}
    try:
        for rank, after in KILLS:
            while _lines(run_dir / "metrics.jsonl") < after:
                if proc.poll() is not None or time.time() - t0 > 300:
                    raise RuntimeError(f"{backend}: job ended or stalled before step {after}")
                time.sleep(0.02)
            info = json.loads((run_dir / "launcher-node0.json").read_text())
            pid = info["actors"][str(rank)]["actor_pid"] if backend == "ray" \
                else info["workers"][str(rank)]
            killed[rank] = time.time()
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    wall = time.time() - t0
    final = json.loads((run_dir / "launcher-node0.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    events = [e for e in report["events"] if e["kind"] == "recovery"]
    rows = []
    for rank, t_kill in killed.items():
        event = next(e for e in events if rank in e["ranks_lost"])
        record_ms = (final["exits"][str(rank)]["time"] - t_kill) * 1e3
        rows.append({"rank": rank, "record_latency_ms": record_ms,
                     "detect_ms": event["phases"]["detect"] * 1e3,
                     "mttr_ms": event["mttr_s"] * 1e3,
                     "kill_to_resume_ms": record_ms + event["mttr_s"] * 1e3,
                     "chosen": event["chosen"]})
    return {"backend": backend, "exit_code": proc.returncode, "wall_s": wall,
            "samples": report["samples"], "replicas_identical": report["replicas_identical"],
            "kills": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(out_dir() / "ray_actor_death.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="odyray-b-", dir="/tmp"))  # short socket paths
    try:
        load_before = os.getloadavg()
        results = [run_once(b, work) for b in ("torchrun", "ray")]
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "compute": "real (tiny GPT, CPU)",
           "loadavg_before": load_before, "loadavg_after": load_after, "runs": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"load {load_before[0]:.1f} -> {load_after[0]:.1f}; real compute")
    print(f"{'backend':<9} {'rank':>4} {'record ms':>10} {'detect ms':>10} {'MTTR ms':>9} "
          f"{'kill->resume ms':>16}  chosen")
    for r in results:
        for k in r["kills"]:
            print(f"{r['backend']:<9} {k['rank']:>4} {k['record_latency_ms']:>10.1f} "
                  f"{k['detect_ms']:>10.1f} {k['mttr_ms']:>9.0f} "
                  f"{k['kill_to_resume_ms']:>16.0f}  {k['chosen']}")
        print(f"{r['backend']:<9} exit {r['exit_code']}, wall {r['wall_s']:.1f}s, samples "
              f"{r['samples']}, replicas identical {r['replicas_identical']}")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Kill -> resume time when a whole node is lost (two launchers, store apart).

Starts `odyssey store`, two `odyssey run --nnodes 2` launchers on loopback (c10d
rendezvous, one real-math worker each, dp=2), SIGKILLs node 0's launcher while its worker
is inside step 4 (an injected 3 s slowdown holds it there), and measures from the kill
(wall clock, taken just before `os.kill`) to the moment the survivor starts the new
generation's first step (`odyssey/gen{g}/started/{rank}` in the store). Also checks the
run finished on the failure-free loss trajectory with a clean sample ledger.

    python -m benchmarks.node_loss --runs 3 --out benchmarks/results/node_loss.json
    python -m benchmarks.node_loss --repo /tmp/old-checkout --runs 3   # another version

Timing-sensitive: wrap in `flock /tmp/odyssey-bench.lock ...` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from odyssey import contract

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _killpg(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def run_once(repo: Path, work: Path, steps: int, launcher_args: list[str],
             python: str = sys.executable) -> dict:
    """One job with node 0 lost; returns kill->resume seconds and the recovery event."""
    from torch.distributed import TCPStore

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "PYTHONPATH": str(repo)}
    endpoint_file = work / "store.json"
    server = subprocess.Popen(
        [python, "-m", "launch.cli", "store", "--host", "127.0.0.1", "--port", "0",
         "--endpoint-file", str(endpoint_file)], cwd=repo, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 30
        while not endpoint_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("odyssey store did not start")
            time.sleep(0.05)
        where = json.loads(endpoint_file.read_text())
        rdzv, run_dir = _free_port(), work / "run"
        for n in range(2):
            with open(work / f"node{n}.log", "w") as log:
                nodes.append(subprocess.Popen(
                    [python, "-m", "launch.cli", "run", "--nnodes", "2", "--nproc-per-node",
                     "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
                     "--rdzv-id", "nodeloss", "--local-addr", "127.0.0.1",
                     "--store-endpoint", f"{where['addr']}:{where['port']}",
                     "--run-dir", str(run_dir), "--finish-grace", "20", *launcher_args,
                     str(repo / "examples" / "train_gpt.py"), "--log-every", "100",
                     "--dp", "2", "--steps", str(steps), "--num-microbatches", "4",
                     "--microbatch-size", "2", *TINY, "--heartbeat-timeout-s", "1.5",
                     "--inject", "slow:rank=0,step=4,delay=3"],
                    cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 90
        while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 4):
            if time.monotonic() > deadline or nodes[1].poll() is not None:
                raise RuntimeError("the job never reached step 4")
            time.sleep(0.05)
        node0 = json.loads((run_dir / "launcher-node0.json").read_text())
        t_kill = time.time()
        os.kill(node0["launcher_pid"], signal.SIGKILL)
        code = nodes[1].wait(timeout=120)
        if code != 0:
            raise RuntimeError(f"node 1 exited {code}; see {work / 'node1.log'}")
        report = json.loads((run_dir / "report.json").read_text())
        [event] = [e for e in report["events"] if e["kind"] == "recovery"]
        client = TCPStore(where["addr"], where["port"], is_master=False,
                          timeout=timedelta(seconds=10))
        started = json.loads(client.get(contract.started_key(event["generation"], 1)))
        exit0 = (json.loads(client.get(contract.exit_key(0)))
                 if client.check([contract.exit_key(0)]) else None)
        del client
        return {"kill_to_resume_s": started["started"] - t_kill, "event": {
                    k: event[k] for k in ("generation", "ranks_lost", "members", "chosen",
                                          "reason", "mttr_s", "phases", "fault_time_source")},
                "exit_record_rank0": exit0, "samples": report["samples"],
                "losses": {m["step"]: m["loss"] for m in map(
                    json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}}
    finally:
        for node in nodes:
            _killpg(node)
        _killpg(server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="checkout to run (default: this one)")
    p.add_argument("--runs", type=int, default=3, help="repetitions (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="training steps (default: 12)")
    p.add_argument("--launcher-args", default="",
                   help="extra `odyssey run` flags, space separated (e.g. '--node-timeout 3')")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp:
            r = run_once(Path(args.repo), Path(tmp), args.steps, args.launcher_args.split())
        results.append(r)
        print(f"run {i}: kill -> resume {r['kill_to_resume_s']:.2f} s "
              f"(report mttr {r['event']['mttr_s']:.2f} s, {r['event']['reason']}); "
              f"ledger {r['samples']}", flush=True)
    times = [r["kill_to_resume_s"] for r in results]
    summary = {"repo": args.repo, "launcher_args": args.launcher_args, "runs": results,
               "kill_to_resume_s": times, "mean_s": sum(times) / len(times),
               "loadavg": os.getloadavg(), "compute": "real (tiny GPT, CPU, gloo)"}
    print(f"kill -> resume: mean {summary['mean_s']:.2f} s over {len(times)} run(s) "
          f"{[round(t, 2) for t in times]}; loadavg {summary['loadavg']}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Odyssey vs DeepSpeed `PipelineEngine`: failure-free step time, same job, side by side.

For each (DP, PP) config both frameworks train the example GPT (examples/gpt.py) with the
same layers (built by `build_layer(i)`, so the same initial weights), the same microbatches
(pipeline d trains microbatches d, d+D, ... of every step), the same even layer split, the
same 1F1B schedule and the same optimizer maths (torch AdamW, lr 3e-3, betas (0.9, 0.95),
wd 0, fp32), on CPU with gloo. Each launch is a fresh torchrun job on 127.0.0.1 with its own
--master-port; the two frameworks alternate (A B, then B A, ...) so slow drift of the
shared machine's load hits both alike. Per launch we take the median step time after
dropping warm-up steps; per config the median over repeats.

* Odyssey: `torchrun ... examples/train_gpt.py`; step time = the leader's `step_time_s`
  in metrics.jsonl (time between the ends of consecutive committed steps).
* DeepSpeed: `torchrun ... benchmarks/_ds_worker.py`; step time = wall clock around
  `engine.train_batch()` on rank 0 (it returns after the loss broadcast, so the step has
  ended on its pipeline; with DP > 1 the gradient all-reduce has synchronised all ranks).

Loss sanity check: Odyssey reports sum(per-sample loss) / global batch. DeepSpeed's loss_fn
returns a microbatch mean; `train_batch()` averages those over the gradient-accumulation
microbatches and then over DP replicas, which with equal microbatches is the same global
batch mean. So the two per-step losses are directly comparable and should agree to float
rounding (they drift apart slowly as rounding differences compound).

    python benchmarks/engine_vs_deepspeed.py             # full: (1,2) (2,2) (1,4), 2 repeats
    python benchmarks/engine_vs_deepspeed.py --quick     # smoke test, ~1 min
    python benchmarks/engine_vs_deepspeed.py --configs 1x2,2x2 --repeats 3 --profile

Needs deepspeed in the running python (scripts/setup_deepspeed.sh). Prints the table and
writes a summary to runs/bench/engine_vs_deepspeed.json (--out to change; the copies
docs/ cite are in benchmarks/results/): per-launch step times and losses, and with
--profile each rank's per-op costs averaged over the steps after warm-up. The raw report,
with one profile line per step, goes to WORK_DIR/report.raw.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import out_dir  # noqa: E402
from odyssey import contract  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
_used_ports: set[int] = set()


# ---- launching ---------------------------------------------------------------------------
def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before in this run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port


def torchrun(python: str, nproc: int, script: str, args: list[str]) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--master-addr", HOST,
            "--master-port", str(free_port()), "--max-restarts", "0", script, *args]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads) from /proc, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_job(cmd: list[str], env: dict, log: Path, timeout_s: float) -> tuple[float, float]:
    """Run one torchrun job in its own process group; kill the group on timeout.

    Returns (wall seconds, CPU seconds of the torchrun agent process itself: its
    monitoring loop and the TCPStore server the workers talk to)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    agent_cpu = 0.0
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while (rc := proc.poll()) is None:
                if time.perf_counter() - t > timeout_s:
                    raise TimeoutError
                c = _cpu_seconds(proc.pid)
                agent_cpu = c if c is not None else agent_cpu
                time.sleep(0.2)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group only
            proc.wait()
            raise RuntimeError(f"timed out after {timeout_s:.0f}s: see {log}") from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"exit code {rc}: {' '.join(cmd[:8])} ...; log {log}:\n{tail}")
    return time.perf_counter() - t, agent_cpu


def model_args(a: argparse.Namespace) -> list[str]:
    return ["--gpt-d-model", str(a.d_model), "--gpt-n-blocks", str(a.n_blocks),
            "--gpt-n-heads", str(a.n_heads), "--gpt-seq-len", str(a.seq_len),
            "--gpt-vocab-size", str(a.vocab_size)]


def job_args(a: argparse.Namespace, dp: int, pp: int) -> list[str]:
    return ["--dp", str(dp), "--pp", str(pp), "--num-microbatches", str(a.num_microbatches),
            "--microbatch-size", str(a.microbatch_size), "--steps", str(a.steps)]


def run_odyssey(a, dp, pp, tag: str, env: dict) -> dict:
    run_dir = a.work_dir / tag
    if run_dir.exists():
        for p in sorted(run_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    script = "benchmarks/_ds_odyssey_profile.py" if a.profile else "examples/train_gpt.py"
    env = {**env, contract.ENV_BENCH_PROFILE_DIR: str(run_dir / "profile")}
    cmd = torchrun(a.python, dp * pp, script,
                   [*job_args(a, dp, pp), "--schedule", "1f1b", "--run-dir", str(run_dir),
                    "--no-resume", "--log-every", str(max(1, a.steps)), *model_args(a)])
    wall, agent_cpu = run_job(cmd, env, a.work_dir / f"{tag}.log", a.timeout)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if x.strip()]
    metrics = [m for m in metrics if "step_time_s" in m]
    out = {"framework": "odyssey", "wall_s": wall, "agent_cpu_s": agent_cpu,
           "step_time_s": [m["step_time_s"] for m in metrics],
           "loss": [m["loss"] for m in metrics]}
    if a.profile:
        out["profile"] = {p.stem: json.loads(p.read_text())
                          for p in sorted((run_dir / "profile").glob("rank*.json"))}
    return out


def run_deepspeed(a, dp, pp, tag: str, env: dict) -> dict:
    out_json = a.work_dir / f"{tag}.json"
    out_json.unlink(missing_ok=True)
    extra = ["--optimizer", a.ds_optimizer] + (["--profile"] if a.profile else [])
    cmd = torchrun(a.python, dp * pp, "benchmarks/_ds_worker.py",
                   [*job_args(a, dp, pp), "--out", str(out_json), *extra, *model_args(a)])
    wall, agent_cpu = run_job(cmd, env, a.work_dir / f"{tag}.log", a.timeout)
    d = json.loads(out_json.read_text())
    d["wall_s"], d["agent_cpu_s"] = wall, agent_cpu
    return d


# ---- statistics and the table ------------------------------------------------------------
def steady(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times


def summarise(cfg_runs: dict, warmup: int) -> dict:
    res = {}
    for fw in ("odyssey", "deepspeed"):
        per_launch = [statistics.median(steady(r["step_time_s"], warmup)) for r in cfg_runs[fw]]
        res[fw] = {"median_step_s": statistics.median(per_launch),
                   "best_launch_s": min(per_launch),
                   "per_launch_median_s": per_launch,
                   "loss_first": cfg_runs[fw][0]["loss"][0],
                   "loss_last": cfg_runs[fw][0]["loss"][-1]}
    o, d = cfg_runs["odyssey"][0]["loss"], cfg_runs["deepspeed"][0]["loss"]
    res["ratio"] = res["odyssey"]["median_step_s"] / res["deepspeed"]["median_step_s"]
    res["ratio_best"] = res["odyssey"]["best_launch_s"] / res["deepspeed"]["best_launch_s"]
    res["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(o, d))
    return res


def table(results: dict) -> str:
    head = (f"{'config':<12}{'odyssey ms':>11}{'deepspeed ms':>14}{'ratio':>7}{'best':>7}   "
            f"{'loss[0] ody / ds':<21}{'loss[-1] ody / ds':<21}{'max|dloss|':>10}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        o, d = r["odyssey"], r["deepspeed"]
        spread_o = "/".join(f"{x * 1e3:.0f}" for x in o["per_launch_median_s"])
        spread_d = "/".join(f"{x * 1e3:.0f}" for x in d["per_launch_median_s"])
        lines.append(
            f"{name:<12}{o['median_step_s'] * 1e3:>11.1f}{d['median_step_s'] * 1e3:>14.1f}"
            f"{r['ratio']:>7.2f}{r['ratio_best']:>7.2f}   "
            f"{o['loss_first']:.4f} / {d['loss_first']:.4f}    "
            f"{o['loss_last']:.4f} / {d['loss_last']:.4f}    {r['max_abs_loss_diff']:>10.1e}"
            f"   (launches ody {spread_o}, ds {spread_d} ms)")
    return "\n".join(lines)


def profile_table(cfg_runs: dict, warmup: int) -> str:
    """Per rank, per op: wall ms / main-thread CPU ms per step (mean after warm-up), plus
    process CPU per step and the busiest threads over the whole run (first launch)."""
    def fmt(ops: dict, cpu: dict) -> str:
        return ", ".join(f"{k} {v * 1e3:.0f}/{cpu.get(k, 0.0) * 1e3:.0f}"
                         for k, v in sorted(ops.items()))

    def threads(tc: dict) -> str:
        top = sorted(tc.items(), key=lambda kv: -kv[1])[:4]
        return ", ".join(f"{k} {v:.1f}s" for k, v in top)

    def mean_dicts(ds: list[dict]) -> dict:
        keys = {k for d in ds for k in d}
        return {k: statistics.mean(d.get(k, 0.0) for d in ds) for k in keys}

    out = []
    ody = cfg_runs["odyssey"][0].get("profile") or {}
    for rank, prof in sorted(ody.items()):
        steps = steady(prof["steps"], warmup)
        ops = mean_dicts([s["op_seconds"] for s in steps])
        cpu = mean_dicts([s.get("op_cpu_seconds", {}) for s in steps])
        extra = {k: statistics.mean(s.get(k, 0.0) for s in steps)
                 for k in ("run_step_s", "cpu_s", "flat_grads_s", "vote_s", "record_s")}
        out.append(f"  odyssey   {rank}: {fmt(ops, cpu)}\n      "
                   + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in extra.items())
                   + f"\n      threads: {threads(prof.get('thread_cpu_s', {}))}")
    ds = cfg_runs["deepspeed"][0].get("op_seconds") or {}
    for rank, prof in sorted(ds.items(), key=lambda kv: int(kv[0])):
        steps = steady(prof["steps"], warmup)
        allk = mean_dicts(steps)
        ops = {k: v for k, v in allk.items() if not k.startswith("cpu") and k != "step_s"}
        cpu = {k[4:]: v for k, v in allk.items() if k.startswith("cpu:")}
        out.append(f"  deepspeed rank{rank}: {fmt(ops, cpu)}\n      "
                   f"step_s {allk.get('step_s', 0) * 1e3:.1f}, "
                   f"cpu_s {allk.get('cpu_s', 0) * 1e3:.1f}"
                   f"\n      threads: {threads(prof.get('thread_cpu_s', {}))}")
    return "\n".join(out) + "\n  (ms per step: wall/main-thread CPU, mean after warm-up)"


def _mean_nested(rows: list[dict]) -> dict:
    """Key-wise mean of dicts of numbers (nested dicts averaged the same way; a key missing
    from a row counts as 0, as in `profile_table`)."""
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        vals = [r.get(k, 0.0) for r in rows]
        if all(isinstance(v, dict) for v in vals):
            out[k] = _mean_nested(vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            out[k] = statistics.mean(vals)
    return out


def summarise_launch(launch: dict, warmup: int) -> dict:
    """One launch as the summary keeps it: per-step times and losses as measured, but each
    rank's per-step profile (``profile`` on the Odyssey side, ``op_seconds`` on DeepSpeed's)
    replaced by its mean over the steps after warm-up (``*_mean``: ``per_step``, ``steps``
    averaged, ``thread_cpu_s`` over the whole run)."""
    out = {k: v for k, v in launch.items() if k not in ("profile", "op_seconds")}
    for key in ("profile", "op_seconds"):
        if launch.get(key):
            out[f"{key}_mean"] = {
                rank: {"per_step": _mean_nested([{k: v for k, v in s.items() if k != "step"}
                                                 for s in steady(prof["steps"], warmup)]),
                       "steps": len(steady(prof["steps"], warmup)),
                       "thread_cpu_s": prof.get("thread_cpu_s", {})}
                for rank, prof in launch[key].items()}
    return out


def summarise_report(report: dict) -> dict:
    """The report as written to --out (and committed): every launch through
    `summarise_launch`; everything else unchanged."""
    warmup = report["settings"]["warmup"]
    runs = {name: {fw: [summarise_launch(r, warmup) for r in launches]
                   for fw, launches in cfg.items()}
            for name, cfg in report["runs"].items()}
    return {**report, "runs": runs}


# ---- main --------------------------------------------------------------------------------
def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        dp, pp = (int(x) for x in item.lower().split("x"))
        out.append((dp, pp))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny GPT, config 1x2, 6 steps, 1 repeat")
    p.add_argument("--configs", default=None,
                   help="comma-separated DPxPP, e.g. 1x2,2x2,1x4 (default: those three)")
    p.add_argument("--repeats", type=int, default=None, help="launches per framework+config")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps dropped from each launch")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-blocks", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--microbatch-size", type=int, default=None)
    p.add_argument("--num-microbatches", type=int, default=8)
    p.add_argument("--ds-optimizer", choices=("torch", "fused"), default="torch",
                   help="DeepSpeed optimizer: torch AdamW (same as Odyssey) or its FusedAdam")
    p.add_argument("--profile", action="store_true",
                   help="record per-op seconds on both sides and print them")
    p.add_argument("--python", default=sys.executable,
                   help="python with torch + deepspeed used for the launches")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--work-dir", type=Path, default=out_dir("engine_vs_deepspeed"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    quick = dict(configs="1x2", repeats=1, steps=6, warmup=2, d_model=64, n_blocks=2,
                 seq_len=32, microbatch_size=4)
    full = dict(configs="1x2,2x2,1x4", repeats=2, steps=24, warmup=4, d_model=256,
                n_blocks=6, seq_len=64, microbatch_size=4)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.out is None:
        a.out = (a.work_dir / "quick.json" if a.quick
                 else out_dir() / "engine_vs_deepspeed.json")
    a.config_list = parse_configs(a.configs)
    for dp, _pp in a.config_list:
        if a.num_microbatches % dp:
            p.error(f"--num-microbatches {a.num_microbatches} must divide by dp={dp}")
    return a


def check_deepspeed(python: str, env: dict) -> str:
    r = subprocess.run([python, "-c", "import deepspeed; print(deepspeed.__version__)"],
                       env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"deepspeed is not importable by {python}: run "
                 f"`VENV=... bash scripts/setup_deepspeed.sh` and use that venv's python.\n"
                 f"{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version()}


def main(argv=None) -> None:
    a = parse_args(argv)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    ds_version = check_deepspeed(a.python, env)
    import torch  # only for its version in the report

    print(f"[bench] odyssey vs deepspeed {ds_version} on {machine_info()['cpus']} CPUs: "
          f"gpt d_model={a.d_model} blocks={a.n_blocks} seq={a.seq_len}, "
          f"M={a.num_microbatches} x B={a.microbatch_size}, {a.steps} steps "
          f"(drop {a.warmup}), {a.repeats} repeat(s), configs {a.configs}", flush=True)
    raw: dict[str, dict] = {}
    results: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    for dp, pp in a.config_list:
        name = f"dp{dp} pp{pp}"
        runs = {"odyssey": [], "deepspeed": []}
        for rep in range(a.repeats):
            order = ("odyssey", "deepspeed") if rep % 2 == 0 else ("deepspeed", "odyssey")
            for fw in order:
                tag = f"{fw}_dp{dp}_pp{pp}_r{rep}"
                fn = run_odyssey if fw == "odyssey" else run_deepspeed
                r = fn(a, dp, pp, tag, env)
                r["load_avg_1m"] = os.getloadavg()[0]
                load.append(r["load_avg_1m"])
                runs[fw].append(r)
                med = statistics.median(steady(r["step_time_s"], a.warmup))
                print(f"[bench] {name} rep {rep} {fw:<9} median step {med * 1e3:8.1f} ms "
                      f"(launch {r['wall_s']:.1f}s, agent CPU {r['agent_cpu_s']:.1f}s, "
                      f"loss {r['loss'][0]:.4f} -> "
                      f"{r['loss'][-1]:.4f}, load {r['load_avg_1m']:.1f})", flush=True)
        raw[name] = runs
        results[name] = summarise(runs, a.warmup)
        if a.profile:
            print(f"[bench] per-op breakdown {name}:\n{profile_table(runs, a.warmup)}",
                  flush=True)
    text = table(results)
    print("\n" + text)
    print(f"\nratio = odyssey / deepspeed median step time (<1: Odyssey faster). "
          f"Per-config value: median over {a.repeats} launch(es) of each launch's median "
          f"over steps {a.warmup}..{a.steps - 1}; best: ratio of the fastest launch of each. "
          f"Loss = global-batch mean on both sides.")
    report = {
        "benchmark": "engine_vs_deepspeed",
        "date": started,
        "machine": machine_info(), "load_avg_1m": load,
        "versions": {"torch": torch.__version__, "deepspeed": ds_version},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                     if k not in ("config_list",)},
        "method": {"step_time": "median over steps >= warmup per launch, median over launches",
                   "odyssey": "leader step_time_s from metrics.jsonl (torchrun + "
                              "examples/train_gpt.py)",
                   "deepspeed": "rank-0 wall clock around engine.train_batch()",
                   "loss": "global-batch mean per step on both sides"},
        "results": results, "table": text, "elapsed_s": time.perf_counter() - t0,
        "runs": raw,
    }
    raw = a.work_dir / "report.raw.json"
    raw.write_text(json.dumps(report, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summarise_report(report), indent=1))
    print(f"[bench] wrote {a.out} (summary) and {raw}")


if __name__ == "__main__":
    main()

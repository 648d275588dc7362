"""Validate the cluster simulator against the real runtime on a short trace.

The trace: 8 ranks (DP 2 x PP 4, 8 emulated layers of 10 / 20 ms, 8 microbatches of 2),
rank 5 is SIGKILLed in the backward of step `--kill-step`, and a replacement worker is
started `--rejoin-after` seconds later. The real runtime (`odyssey run`, emulated
compute: real processes, process groups, sends, all-reduces, kill, agreement, recovery,
migration) runs it; then the simulator replays the same events (the loss at the
injector's kill time, the arrival when the runtime noticed the newcomer) with the same
cost model, recovery functions and policy, step times from the event simulator scaled
by the job's failure-free measured/predicted ratio (the online correction the live
leader applies too), and transition costs from the MTTR benchmark's phases (not from
this run). Compared: cumulative samples over time (largest gap, in steps), throughput
per phase (before the loss, degraded, after the rejoin) and the total. Agreement target:
within 10%. The replacement's process start-up (torch import, seconds under load) is not
modelled: its arrival is placed where the runtime noticed it.

    python benchmarks/sim_vs_runtime.py                 # writes results/sim_vs_runtime.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, launch  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402
from planner.cluster_sim import (  # noqa: E402
    ClusterConfig,
    SimConfig,
    TransitionConfig,
    simulate_trace,
)
from planner.cost import CostModel  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.simulate import simulate_plan  # noqa: E402
from planner.traces import TraceEvent, format_trace, initial_nodes  # noqa: E402
from profiler.synthetic import emulated_profile  # noqa: E402

DP, PP, LAYERS, F_MS, B_MS, MBS, MB = 2, 4, 8, 10.0, 20.0, 8, 2


def run_runtime(args, run_dir: Path) -> dict:
    return launch(DP * PP, run_dir, [
        "--mode", "emulated", "--dp", str(DP), "--pp", str(PP), "--steps", str(args.steps),
        "--num-microbatches", str(MBS), "--microbatch-size", str(MB), "--log-every", "1000",
        "--emu-num-layers", str(LAYERS), "--emu-forward-ms", str(F_MS),
        "--emu-backward-ms", str(B_MS), "--ft-policy", args.policy,
        "--checkpoint-every", "1000", "--horizon-s", str(args.horizon_s),
        "--inject", f"kill:rank={args.victim},step={args.kill_step},phase=backward"],
        timeout_s=600, extra_launcher_args=["--rejoin-after", str(args.rejoin_after)])


def measured(run_dir: Path, report: dict) -> dict:
    """The runtime's timeline, t=0 at the end of step 0 (warm-up excluded)."""
    m = read_jsonl(run_dir / "metrics.jsonl")
    t0 = m[0]["time"]
    kill = read_jsonl(run_dir / "faults.jsonl")[0]["time"] - t0
    ev = [e for e in report["events"] if e["kind"] == "recovery"]
    join = next(e for e in ev if e["newcomers"])
    noticed = next(x["time"] for x in m if x["step"] == join["resume_step"] - 1) - t0
    return {"steps": [(x["step"], x["time"] - t0) for x in m[1:]], "kill_s": kill,
            "join_s": noticed,
            "events": [{**{k: e[k] for k in ("cause", "chosen", "mttr_s", "phases",
                                             "resume_step", "predicted_step_s")},
                        "pipelines": [len(p["stages"]) for p in e["plan"]["pipelines"]]}
                       for e in ev],
            "ff_step_s": statistics.median(x["step_time_s"] for x in m[1:args_kill(m, kill)])}


def args_kill(m: list[dict], kill: float) -> int:
    t0 = m[0]["time"]
    return max(2, next(i for i, x in enumerate(m) if x["time"] - t0 > kill))


def simulated(meas: dict, args) -> tuple[dict, object]:
    cfg = SimpleNamespace(num_layers=LAYERS, forward_ms=F_MS, backward_ms=B_MS, dim=64)
    cost = CostModel(emulated_profile(cfg))
    plan = Plan.uniform(LAYERS, DP, PP, MBS, MB)
    predicted = simulate_plan(plan, cost).step_time_s
    factor = meas["ff_step_s"] / predicted
    victim = f"node{args.victim}"
    events = [*initial_nodes(DP * PP), TraceEvent(meas["kill_s"], "remove", victim),
              TraceEvent(meas["join_s"], "add", victim)]
    end = meas["steps"][-1][1]
    cluster = ClusterConfig(num_nodes=1, gpus_per_node=DP * PP, trace_node_gpus=1)
    # the MTTR benchmark's reparallelize phases (docs/BENCHMARKS.md, run 1), not this run's
    tc = TransitionConfig(detect_s=0.087, agree_s=0.116, plan_s=0.151, rebuild_s=0.068,
                          transfer_Bps=500e6, checkpoint_interval_s=1e9)
    res = simulate_trace(args.policy, plan, cost, events, cluster, tc,
                         SimConfig(duration_s=end, horizon_s=args.horizon_s, predictor="event",
                                   step_factor=factor))
    return {"predicted_ff_step_s": predicted, "step_factor": factor,
            "trace": format_trace(events)}, res


def cumulative(res, t: float) -> float:
    """Samples the simulator has committed by time t (segments are piecewise linear;
    whole steps only: a step counts when it ends)."""
    done = 0.0
    for s in res.segments:
        if s.what != "train" or s.t0 >= t:
            continue
        step = MBS * MB / s.samples_per_s
        done += int((min(s.t1, t) - s.t0) / step + 1e-6) * MBS * MB
    return done


def compare(meas: dict, res) -> dict:
    gb = MBS * MB
    real = [(t, (i + 1) * gb) for i, (_, t) in enumerate(meas["steps"])]
    errs = [(t, cumulative(res, t + 1e-6), n) for t, n in real]
    gap_steps = max(abs(s - n) / gb for _, s, n in errs)
    phases = {"before loss": (0.0, meas["kill_s"]),
              "degraded": (meas["kill_s"], meas["join_s"]),
              "after rejoin": (meas["join_s"], meas["steps"][-1][1])}
    out = {}
    for name, (a, b) in phases.items():
        n_real = sum(gb for _, t in meas["steps"] if a < t <= b)
        n_sim = cumulative(res, b + 1e-6) - cumulative(res, a + 1e-6)
        out[name] = {"real_samples_per_s": n_real / (b - a), "sim_samples_per_s": n_sim / (b - a),
                     "error": n_sim / n_real - 1 if n_real else None}
    total_real = real[-1][1]
    total_sim = cumulative(res, real[-1][0] + 1e-6)
    return {"phases": out, "largest_gap_steps": gap_steps, "total_real": total_real,
            "total_sim": total_sim, "total_error": total_sim / total_real - 1,
            "points": errs}


def plot(meas: dict, res, cmp: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ts = [t for t, _, _ in cmp["points"]]
    ax1.plot(ts, [n for _, _, n in cmp["points"]], "o-", ms=3, label="runtime (emulated)")
    ax1.plot(ts, [s for _, s, _ in cmp["points"]], "s--", ms=3, label="simulator")
    ax1.set_ylabel("samples committed")
    ax1.legend(fontsize=8)
    steps = meas["steps"]
    rt = [(b[1], MBS * MB / (b[1] - a[1])) for a, b in zip(steps, steps[1:])]
    ax2.plot([t for t, _ in rt], [v for _, v in rt], "o-", ms=3, label="runtime, per step")
    xs, ys = [], []
    for s in res.segments:
        xs += [s.t0, s.t1]
        ys += [s.samples_per_s, s.samples_per_s]
    ax2.plot(xs, ys, "-", label="simulator")
    for t, c in ((meas["kill_s"], "red"), (meas["join_s"], "green")):
        for ax in (ax1, ax2):
            ax.axvline(t, color=c, lw=0.8, ls=":")
    ax2.set_ylabel("samples/s")
    ax2.set_xlabel("seconds since the end of step 0 (red: kill, green: rejoin noticed)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"simulator vs runtime: total {cmp['total_error']:+.1%}, largest gap "
                 f"{cmp['largest_gap_steps']:.0f} step(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--kill-step", type=int, default=10)
    ap.add_argument("--victim", type=int, default=5)
    ap.add_argument("--rejoin-after", type=float, default=8.0)
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--horizon-s", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output names (repeats)")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report = run_runtime(args, run_dir)
        meas = measured(run_dir, report)
    info, res = simulated(meas, args)
    cmp = compare(meas, res)
    recs = [(e["cause"], e["chosen"], e["pipelines"], f"MTTR {e['mttr_s']:.3f} s",
             f"predicted step {e['predicted_step_s']:.3f} s") for e in meas["events"]]
    print(f"runtime: kill at {meas['kill_s']:.2f} s, rejoin noticed at {meas['join_s']:.2f} s;"
          f" recoveries {recs}")
    print(f"simulator: {res.events}, step factor {info['step_factor']:.3f} (measured "
          f"{meas['ff_step_s'] * 1e3:.1f} ms / predicted {info['predicted_ff_step_s'] * 1e3:.1f}"
          f" ms), load {load[0]:.1f}")
    print("| phase | runtime samples/s | simulator samples/s | error |")
    print("|---|---|---|---|")
    for name, p in cmp["phases"].items():
        print(f"| {name} | {p['real_samples_per_s']:.2f} | {p['sim_samples_per_s']:.2f} | "
              f"{p['error']:+.1%} |")
    print(f"| total samples | {cmp['total_real']:.0f} | {cmp['total_sim']:.0f} | "
          f"{cmp['total_error']:+.1%} |")
    print(f"cumulative samples: largest gap {cmp['largest_gap_steps']:.0f} step(s) of "
          f"{MBS * MB} samples")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sim_vs_runtime" + (f".{args.tag}" if args.tag else "")
    plot(meas, res, cmp, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(
        {"load": load, "args": vars(args), "measured": meas, "sim": info,
         "sim_result": res.row(), "compare": cmp}, indent=1, default=str))
    print(f"wrote {out / name}.png and .json")
    ok = abs(cmp["total_error"]) <= 0.10 and all(
        abs(p["error"]) <= 0.10 for p in cmp["phases"].values() if p["error"] is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

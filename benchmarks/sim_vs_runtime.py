"""Validate the cluster simulator against the real runtime on a multi-event trace.

The job: 8 ranks (DP 2 x PP 4, 8 emulated layers of 10 / 20 ms, 8 microbatches of 2),
one rank per trace node. The trace (`ms,add|remove,nodeN`, the Bamboo/Oobleck format) is
`--trace FILE` or, by default, generated and written next to the results: node5 lost at
6 s, node2 at 18 s, node5 back at 30 s, node1 lost at 44 s, node2 back at 56 s.

The real runtime (`odyssey run`, **emulated compute**: real processes, process groups,
sends, all-reduces, kills, agreement, recovery, migration) runs the job while
`launch.replay_trace` drives the trace into it at the trace times (t=0: end of step 0):
a `remove` SIGKILLs the node's rank in the backward of its next step (`odyssey inject
--kind kill`), an `add` starts a replacement worker (`odyssey inject --kind rejoin`).
The simulator then replays the same events at the times the runtime applied them (a
loss at the injector's kill time, an arrival where the runtime noticed the newcomer:
the replacement's process start-up is not modelled), with the same cost model, recovery
functions and policy, step times from the event simulator scaled by the job's
failure-free measured/predicted ratio (the online correction the live leader applies
too), and transition costs from the MTTR benchmark's phases (not from this run).
Compared: throughput per phase between events, cumulative samples over time (largest
gap, in steps) and the total; target: within 10%. Also the plan each side chose at
each event.

Rank order: the simulator puts a returning node in the lowest free slot, the runtime
gives it a new rank (world_size + k); plans are laid out in rank order, so a node lost
after a return may hold a different stage on the two sides. The default trace loses
node1 then, whose place is the same on both; for other traces a warning names each
loss where the places differ.

    python benchmarks/sim_vs_runtime.py --tag run1     # writes results/sim_vs_runtime.run1.*
    python benchmarks/sim_vs_runtime.py --trace my.csv --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, TRAIN, out_dir  # noqa: E402
from launch.replay_trace import Injection, plan_injections, replay, wait_for_step0  # noqa: E402
from odyssey.report import read_jsonl  # noqa: E402
from planner.cluster.sim import (  # noqa: E402
    ClusterConfig,
    SimConfig,
    TransitionConfig,
    simulate_trace,
)
from planner.cluster.traces import (  # noqa: E402
    TraceError,
    TraceEvent,
    format_trace,
    initial_nodes,
    load_trace,
)
from planner.cluster.validation import (  # noqa: E402
    B_MS,
    DP,
    F_MS,
    GB,
    LAYERS,
    LOSS,
    MB,
    MBS,
    PP,
    WORLD,
    compare,
    default_trace,
    rank_order_mismatches,
)
from planner.cost import CostModel  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.simulate import simulate_plan  # noqa: E402
from profiler.synthetic import emulated_profile  # noqa: E402


def run_runtime(args, run_dir: Path, injections: list[Injection]) -> tuple[dict, list[dict]]:
    """Launch the job, drive the trace into it, wait for the end; (report, sent requests)."""
    cmd = [sys.executable, "-m", "launch.cli", "run", "--standalone", "--nproc-per-node",
           str(WORLD), "--run-dir", str(run_dir), str(TRAIN),
           "--mode", "emulated", "--dp", str(DP), "--pp", str(PP), "--steps", str(args.steps),
           "--num-microbatches", str(MBS), "--microbatch-size", str(MB), "--log-every", "1000",
           "--emu-num-layers", str(LAYERS), "--emu-forward-ms", str(F_MS),
           "--emu-backward-ms", str(B_MS), "--ft-policy", args.policy,
           "--checkpoint-every", "100000", "--horizon-s", str(args.horizon_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    log = open(run_dir.parent / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        t0 = wait_for_step0(run_dir, alive, timeout_s=300)
        sent = replay(injections, run_dir, t0, args.phase, alive)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    if rc != 0:
        tail = (run_dir.parent / "job.log").read_text()[-3000:]
        raise RuntimeError(f"odyssey run failed ({rc}):\n{tail}")
    return json.loads((run_dir / "report.json").read_text()), sent


def applied_events(injections: list[Injection], faults: list[dict], recoveries: list[dict],
                   metrics: list[dict]) -> list[dict]:
    """When the runtime applied each injection (seconds since the end of step 0): a kill
    at the injector's record, a rejoin at the end of the step before the recovery that
    admitted the newcomer. None where it never happened (e.g. the job ended first)."""
    t0 = metrics[0]["time"]
    end_of = {x["step"]: x["time"] - t0 for x in metrics}
    out = []
    for inj in injections:
        at = None
        if inj.kind == "kill":
            at = next((f["time"] - t0 for f in faults if f["rank"] == inj.rank), None)
        else:
            rec = next((e for e in recoveries if inj.rank in e["newcomers"]), None)
            at = end_of.get(rec["resume_step"] - 1) if rec else None
        out.append({"kind": inj.kind, "node": inj.node, "rank": inj.rank,
                    "trace_s": inj.time_s, "applied_s": at})
    return out


def measured(run_dir: Path, report: dict, injections: list[Injection]) -> dict:
    """The runtime's timeline, t=0 at the end of step 0 (warm-up excluded)."""
    m = read_jsonl(run_dir / "metrics.jsonl")
    t0 = m[0]["time"]
    rec = [e for e in report["events"] if e["kind"] == "recovery"]
    applied = applied_events(injections, read_jsonl(run_dir / "faults.jsonl"), rec, m)
    first = min((a["applied_s"] for a in applied if a["applied_s"] is not None),
                default=m[-1]["time"] - t0)
    ff = [x["step_time_s"] for x in m[1:] if x["time"] - t0 < first] or [m[1]["step_time_s"]]
    return {"steps": [(x["step"], x["time"] - t0) for x in m[1:]], "applied": applied,
            "recoveries": [{**{k: e[k] for k in ("cause", "chosen", "mttr_s", "phases",
                                                 "resume_step", "predicted_step_s",
                                                 "ranks_lost", "newcomers")},
                            "pipelines": [len(p["stages"]) for p in e["plan"]["pipelines"]]}
                           for e in rec],
            "ff_step_s": statistics.median(ff)}


def simulated(meas: dict, args) -> tuple[dict, object]:
    cfg = SimpleNamespace(num_layers=LAYERS, forward_ms=F_MS, backward_ms=B_MS, dim=64)
    cost = CostModel(emulated_profile(cfg))
    plan = Plan.uniform(LAYERS, DP, PP, MBS, MB)
    predicted = simulate_plan(plan, cost).step_time_s
    factor = meas["ff_step_s"] / predicted
    events = [*initial_nodes(WORLD), *(
        TraceEvent(a["applied_s"], "remove" if a["kind"] == "kill" else "add", a["node"])
        for a in meas["applied"] if a["applied_s"] is not None)]
    events.sort(key=lambda e: e.time_s)
    end = meas["steps"][-1][1]
    cluster = ClusterConfig(num_nodes=1, gpus_per_node=WORLD, trace_node_gpus=1)
    # the MTTR benchmark's reparallelize phases (docs/BENCHMARKS.md, run 1), not this run's
    tc = TransitionConfig(detect_s=0.087, agree_s=0.116, plan_s=0.151, rebuild_s=0.068,
                          transfer_Bps=500e6, checkpoint_interval_s=1e9)
    res = simulate_trace(args.policy, plan, cost, events, cluster, tc,
                         SimConfig(duration_s=end, horizon_s=args.horizon_s, predictor="event",
                                   step_factor=factor))
    return {"predicted_ff_step_s": predicted, "step_factor": factor,
            "trace": format_trace(events)}, res


def plot(meas: dict, res, cmp: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ts = [t for t, _, _ in cmp["points"]]
    ax1.plot(ts, [n for _, _, n in cmp["points"]], "-", lw=1.5, label="runtime (emulated)")
    ax1.plot(ts, [s for _, s, _ in cmp["points"]], "--", lw=1.5, label="simulator")
    ax1.set_ylabel("samples committed")
    ax1.legend(fontsize=8, loc="upper left")
    steps = meas["steps"]
    rt = [(b[1], GB / (b[1] - a[1])) for a, b in zip(steps, steps[1:])]
    ax2.plot([t for t, _ in rt], [v for _, v in rt], ".", ms=3, alpha=0.6,
             label="runtime, per step")
    ax2.hlines([p["real_samples_per_s"] for p in cmp["phases"]], [p["t0"] for p in cmp["phases"]],
               [p["t1"] for p in cmp["phases"]], color="C0", lw=1.5, label="runtime, phase mean")
    xs, ys = [], []
    for s in res.segments:
        xs += [s.t0, s.t1]
        ys += [s.samples_per_s, s.samples_per_s]
    ax2.plot(xs, ys, "-", color="C1", lw=1, label="simulator")
    top = max(v for _, v in rt) if rt else 1.0
    for a in meas["applied"]:
        if a["applied_s"] is None:
            continue
        c = "red" if a["kind"] == LOSS else "green"
        for ax in (ax1, ax2):
            ax.axvline(a["applied_s"], color=c, lw=0.8, ls=":")
        ax2.text(a["applied_s"], top * 1.02, ("-" if a["kind"] == LOSS else "+") + a["node"],
                 color=c, fontsize=7, ha="center")
    ax2.set_ylim(0, top * 1.1)
    ax2.set_ylabel("samples/s")
    ax2.set_xlabel("seconds since the end of step 0 (red: loss applied, green: arrival noticed)")
    ax2.legend(fontsize=8, loc="lower right")
    worst = max((abs(p["error"]) for p in cmp["phases"] if p["error"] is not None), default=0)
    fig.suptitle(f"simulator vs runtime on a trace: total {cmp['total_error']:+.1%}, worst "
                 f"phase {worst:.1%}, largest gap {cmp['largest_gap_steps']:.0f} step(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_lines(meas: dict, info: dict, res, cmp: dict, load) -> list[str]:
    rec = [(e["cause"], e["chosen"], e["pipelines"], f"MTTR {e['mttr_s']:.3f} s")
           for e in meas["recoveries"]]
    app = [(a["kind"], a["node"], a["rank"], a["trace_s"],
            None if a["applied_s"] is None else round(a["applied_s"], 2))
           for a in meas["applied"]]
    lines = [f"runtime: applied (kind, node, rank, trace s, applied s) {app}",
             f"runtime recoveries: {rec}",
             f"simulator: {res.events}, step factor {info['step_factor']:.3f} (measured "
             f"{meas['ff_step_s'] * 1e3:.1f} ms / predicted "
             f"{info['predicted_ff_step_s'] * 1e3:.1f} ms), load {load[0]:.1f}",
             "| phase | from-to (s) | runtime samples/s | simulator samples/s | error |",
             "|---|---|---|---|---|"]
    for p in cmp["phases"]:
        err = "n/a" if p["error"] is None else f"{p['error']:+.1%}"
        lines.append(f"| {p['phase']} | {p['t0']:.1f}-{p['t1']:.1f} | "
                     f"{p['real_samples_per_s']:.2f} | {p['sim_samples_per_s']:.2f} | {err} |")
    lines.append(f"| total samples | | {cmp['total_real']:.0f} | {cmp['total_sim']:.0f} | "
                 f"{cmp['total_error']:+.1%} |")
    lines.append(f"cumulative samples: largest gap {cmp['largest_gap_steps']:.0f} step(s) of "
                 f"{GB} samples")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help="ms,add|remove,nodeN file, nodes node0..7 "
                    "(default: the generated five-event trace, written next to the results)")
    ap.add_argument("--steps", type=int, default=180,
                    help="steps of the job; it must outlast the trace (default: %(default)s)")
    ap.add_argument("--phase", default="backward",
                    help="where in its next step a lost node's rank is killed")
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--horizon-s", type=float, default=60.0)
    ap.add_argument("--out", default=str(out_dir()))
    ap.add_argument("--tag", default="", help="suffix of the output names (repeats)")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="no job: re-simulate, compare and plot the measurement recorded in "
                    "a previous run's JSON (rewrites that JSON and its PNG)")
    args = ap.parse_args(argv)
    if args.from_json:
        return resimulate(Path(args.from_json))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sim_vs_runtime" + (f".{args.tag}" if args.tag else "")
    if args.trace:
        trace_path = Path(args.trace)
    else:
        trace_path = out / f"{name}.trace.csv"
        trace_path.write_text(format_trace(default_trace()))
    try:  # a bad trace fails here, before the job starts
        events = load_trace(trace_path)
        injections = plan_injections(events, WORLD)
    except TraceError as e:
        print(f"sim_vs_runtime: {e}", file=sys.stderr)
        return 2
    print(f"trace: {trace_path} ({len(injections)} events after t=0)")
    for msg in rank_order_mismatches(events, injections):
        print(f"warning: {msg}: the two sides may lose different stages")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        report, sent = run_runtime(args, run_dir, injections)
        meas = measured(run_dir, report, injections)
    meas["sent"] = sent
    rec = {"load": load, "load_after": os.getloadavg(), "args": vars(args),
           "trace_file": str(trace_path), "measured": meas}
    return finish(rec, args, out / f"{name}.json")


def finish(rec: dict, args, path: Path) -> int:
    """Simulate the recorded measurement, print the comparison, write JSON and PNG;
    0 when every phase and the total are within 10%."""
    meas = rec["measured"]
    info, res = simulated(meas, args)
    cmp = compare(meas, res)
    print("\n".join(report_lines(meas, info, res, cmp, rec["load"])))
    plot(meas, res, cmp, path.with_suffix(".png"))
    path.write_text(json.dumps({**rec, "sim": info, "sim_result": res.row(),
                                "sim_events": res.events, "compare": cmp},
                               indent=1, default=str))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    ok = abs(cmp["total_error"]) <= 0.10 and all(
        abs(p["error"]) <= 0.10 for p in cmp["phases"] if p["error"] is not None)
    return 0 if ok else 1


def resimulate(path: Path) -> int:
    rec = json.loads(path.read_text())
    if "applied" not in rec.get("measured", {}):
        raise SystemExit(f"{path}: not a trace-mode sim_vs_runtime JSON (no measured.applied)")
    rec["measured"]["steps"] = [tuple(x) for x in rec["measured"]["steps"]]
    args = SimpleNamespace(**rec["args"])
    keep = {k: rec[k] for k in ("load", "load_after", "args", "trace_file", "measured")
            if k in rec}
    return finish(keep, args, path)


if __name__ == "__main__":
    sys.exit(main())

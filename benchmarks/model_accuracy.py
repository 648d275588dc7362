"""How accurate is the performance model? Predict, then measure, 16 configurations per mode.

Calibration uses only what a user has *before* choosing a plan: the profile (emulated:
the configured sleeps; real: `profile_model` on the example GPT, one thread), the
communication sweep (`bench_comm`, three sweeps pooled) and single-stage (DP=1, PP=1)
runs of the real launcher + engine. From the single-stage runs, with every instruction
timed (`_model_accuracy_worker.py`), come the per-kind factors (forward, backward,
optimizer: measured / modelled seconds per run, median over the three most recent
runs, fed to `CostModel.observe`) and a fixed per-step overhead (median of measured -
calibrated simulated step time: commit protocol, the leader's bookkeeping, an
optimizer the profile does not time). The load of a shared machine drifts, so by
default one more single-stage run right before each configuration refreshes the factors
(`--no-interleave`: calibrate once at the start). The configurations being predicted
never feed the calibration.

Every configuration (DP x PP in (1,2) (2,1) (1,4) (2,2) (4,1), 4 and 8 microbatches,
uniform and one skewed partition where PP > 1) is predicted with `simulate_plan`
(the event simulator) + the fixed overhead and measured with real processes under
`odyssey run` (`benchmarks.common.launch`): median step time of the steps after
warm-up. Reported: per-configuration error, MAPE, max error and Kendall's tau between
predicted and measured step times per mode, plus where each run's time went (per-op
wall time, p2p latency, commit) and an error decomposition.

Memory: the cost model's per-rank peak (parameters + gradients + AdamW state +
activations in flight by schedule) against bytes counted in the running engine (ranks
as threads): unique storages saved for backward (`saved_tensors_hooks`) plus stage
output buffers alive at the peak, and parameter / gradient / optimizer-state bytes of
the actual tensors. The engine is instrumented from outside (module hooks, a global
optimizer hook); it is not modified.

    python benchmarks/model_accuracy.py                        # both modes, ~20-60 min
    python benchmarks/model_accuracy.py --modes emulated --skip-memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
import torch  # noqa: E402

from benchmarks.common import out_dir  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey.job_config import job_config  # noqa: E402
from odyssey.testing.memory import measure_memory  # noqa: E402
from planner.accuracy import kendall_tau, mape, max_ape, rel_errors  # noqa: E402
from planner.calibrate import Calibration, CalibrationConfig  # noqa: E402
from planner.cost import CostConfig, CostModel  # noqa: E402
from planner.memory import plan_memory  # noqa: E402
from planner.plan import Plan, even_partition  # noqa: E402
from planner.simulate import simulate_plan  # noqa: E402
from profiler.profile import CommProfile, Profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((1, 2), (2, 1), (1, 4), (2, 2), (4, 1))
MICROBATCHES = (4, 8)


# ---- configurations -----------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    dp: int
    pp: int
    microbatches: int
    partition: tuple[int, ...]

    @property
    def ranks(self) -> int:
        return self.dp * self.pp

    def label(self, num_layers: int) -> str:
        skew = "" if list(self.partition) == even_partition(num_layers, self.pp) else \
            " skew" + "-".join(map(str, self.partition))
        return f"{self.dp}x{self.pp} m{self.microbatches}{skew}"


def configurations(num_layers: int, skewed: dict[int, tuple[int, ...]]) -> list[Config]:
    """Every shape x microbatch count, uniform; plus the skewed partition where PP > 1."""
    out = []
    for dp, pp in SHAPES:
        for m in MICROBATCHES:
            out.append(Config(dp, pp, m, tuple(even_partition(num_layers, pp))))
            if pp > 1:
                out.append(Config(dp, pp, m, tuple(skewed[pp])))
    return out


@dataclass
class Mode:
    """What one mode runs: the model, its profile, the launch arguments."""

    name: str
    num_layers: int
    microbatch_size: int
    skewed: dict[int, tuple[int, ...]]
    script_args: list[str]
    build: Callable[[], tuple[object, object]]
    profile: Profile | None = None
    notes: dict = field(default_factory=dict)

    def plan(self, c: Config) -> Plan:
        return Plan.uniform(self.num_layers, c.dp, c.pp, c.microbatches,
                            self.microbatch_size, "1f1b", partition=list(c.partition))

    def train_args(self, c: Config, steps: int) -> list[str]:
        return ["--mode", self.name, "--dp", str(c.dp), "--pp", str(c.pp),
                "--num-microbatches", str(c.microbatches),
                "--microbatch-size", str(self.microbatch_size),
                "--partition", *map(str, c.partition), "--steps", str(steps),
                "--log-every", "1000", "--no-resume", *self.script_args]


EMU = {"num_layers": 8, "forward_ms": 10.0, "backward_ms": 20.0, "dim": 16}
GPT = {"d_model": 128, "n_blocks": 4, "seq_len": 64, "n_heads": 4, "vocab_size": 64}


def emulated_mode(mb: int = 2) -> Mode:
    from odyssey.data import RandomRegression
    from odyssey.emulate import EmulationConfig, build_emulated
    from profiler.synthetic import emulated_profile

    emu = EmulationConfig(**EMU)
    args = [f"--emu-{k.replace('_', '-')}={v}" for k, v in EMU.items()]
    mode = Mode("emulated", emu.num_layers, mb, {2: (3, 5), 4: (1, 2, 2, 3)}, args,
                lambda: (build_emulated(emu), RandomRegression(dim=emu.dim)))
    mode.profile = emulated_profile(emu, microbatch_sizes=(mb,))
    return mode


def real_mode(mb: int = 4, repeats: int = 15) -> Mode:
    from examples.gpt import GPTConfig, build_gpt
    from odyssey.data import ArithmeticTokens
    from profiler.layers import LayerProfilerConfig, profile_model
    from profiler.timing import TimingConfig

    gpt = GPTConfig(**GPT)
    data = ArithmeticTokens(gpt.vocab_size, gpt.seq_len)
    args = [f"--gpt-{k.replace('_', '-')}={v}" for k, v in GPT.items()]
    mode = Mode("real", gpt.n_blocks + 2, mb, {2: (2, 4), 4: (1, 1, 1, 3)}, args,
                lambda: (build_gpt(gpt), data))
    torch.set_num_threads(1)
    t0 = time.time()
    mode.profile = profile_model(
        build_gpt(gpt),
        LayerProfilerConfig(microbatch_sizes=(mb,), timing=TimingConfig(3, repeats),
                            num_threads=1),
        input_fn=lambda n: data.batch(list(range(n)))[0],
        target_fn=lambda n: data.batch(list(range(n)))[1],
        run_config={"gpt": GPT, "threads": 1})
    mode.notes["profile_wall_s"] = time.time() - t0
    return mode


# ---- measuring ----------------------------------------------------------------------
def measure_step(mode: Mode, c: Config, steps: int, drop: int, timeline: bool = False
                 ) -> dict:
    """Launch the configuration under `odyssey run`; median step time after warm-up.

    With `timeline`, the ranks run `_model_accuracy_worker.py` (train_gpt.py with every
    instruction's start/end recorded) and `ranks` holds their per-step timelines."""
    import benchmarks.common as common

    with tempfile.TemporaryDirectory(prefix="model-accuracy-") as d:
        run_dir, logs = Path(d) / "run", Path(d) / "ops"
        train = common.TRAIN
        if timeline:
            logs.mkdir()
            os.environ[contract.ENV_OPLOG_DIR] = str(logs)
            common.TRAIN = ROOT / "benchmarks" / "_model_accuracy_worker.py"
        t0 = time.time()
        try:
            report = common.launch(c.ranks, run_dir, mode.train_args(c, steps), timeout_s=900)
        finally:
            common.TRAIN = train
            os.environ.pop(contract.ENV_OPLOG_DIR, None)
        times = common.step_times(run_dir, drop)
        ranks = {}
        if timeline:
            for r in range(c.ranks):
                lines = (logs / f"ops-rank{r}.jsonl").read_text().splitlines()
                ranks[r] = [json.loads(x) for x in lines][drop:]
    if report["samples"]["lost"] or report["samples"]["duplicated"]:
        raise RuntimeError(f"{c}: samples lost or duplicated: {report['samples']}")
    out = {"median_s": statistics.median(times), "step_times_s": times,
           "wall_s": time.time() - t0, "load": os.getloadavg()[0]}
    if timeline:
        out["ranks"] = ranks
    return out


def _uncalibrated(cost: CostModel, kind: str, start: int, end: int, mb: int) -> float:
    if kind == "forward":
        return cost.forward_s(start, end, mb) / cost.factor(kind)
    if kind == "backward":
        return cost.backward_s(start, end, mb) / cost.factor(kind)
    return cost.optimizer_s(start, end) / cost.factor("optimizer")


def split_timeline(mode: Mode, c: Config, cost: CostModel, ranks: dict[int, list[dict]]
                   ) -> dict:
    """Where a timed run's time went, in the model's terms: measured / modelled
    (uncalibrated) wall time of forward, backward and optimizer instructions (ratio of
    their sums over the run); p2p
    latency seen by a receiver that was already waiting when the message was sent;
    commit durations; the leader's optimizer step; and the leader's time between two
    `run_step` calls (the trainer loop: vote bookkeeping, metrics)."""
    plan = mode.plan(c)
    mb = mode.microbatch_size
    # per kind: [sum of measured, sum of modelled] -> a ratio of sums (the step time is
    # a sum of durations, so the mean, stalls included, is what matters; a median or
    # geometric mean would miss the tails a loaded machine adds)
    sums: dict[str, list[float]] = {"forward": [0.0, 0.0], "backward": [0.0, 0.0],
                                    "optimizer_step": [0.0, 0.0]}
    commit, vote, wait_ar, p2p = [], [], [], []
    sends: dict[tuple[int, int, str, int], float] = {}
    for r, steps_ in ranks.items():
        st = plan.stage(r)
        for s in steps_:
            for op, m, t0, t1 in s["ops"]:
                if op in sums:
                    pred = _uncalibrated(cost, op, st.start, st.end, mb)
                    if pred > 0:
                        sums[op][0] += t1 - t0
                        sums[op][1] += pred
                elif op == "commit":
                    commit.append(t1 - t0)
                    votes = [(a, b) for o, _, a, b in s["ops"] if o == "vote"]
                    if votes:  # the commit instruction = wait for comm + vote
                        vote.append(votes[0][1] - votes[0][0])
                        wait_ar.append(votes[0][0] - t0)
                elif op.startswith("send_"):
                    sends[(s["step"], r, op[5:], m)] = t1
    for r, steps_ in ranks.items():
        pi, si = plan.stage_of(r)
        stages = plan.pipelines[pi].stages
        for s in steps_:
            for op, m, t0, t1 in s["ops"]:
                if op.startswith("recv_"):
                    kind = op[5:]
                    src = stages[si - 1].rank if kind == "act" else stages[si + 1].rank
                    sent = sends.get((s["step"], src, kind, m))
                    if sent is not None and t0 < sent:  # receiver waited: pure latency
                        p2p.append(t1 - sent)
    lead = ranks[0]
    outside = [b["start"] - a["end"] for a, b in zip(lead, lead[1:])]
    optim = [sum(t1 - t0 for op, _, t0, t1 in s["ops"] if op == "optimizer_step")
             for s in lead]

    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    return {"compute_ratio": {k: (m / p if p else float("nan")) for k, (m, p) in sums.items()},
            "p2p_latency_s": med(p2p), "p2p_samples": len(p2p), "commit_s": med(commit),
            "commit_comm_wait_s": med(wait_ar), "commit_vote_s": med(vote),
            "leader_optimizer_s": med(optim), "leader_outside_run_step_s": med(outside)}


def comm_sweep(repeats: int = 3) -> CommProfile:
    """`bench_comm` `repeats` times; the fits use each point's median over the sweeps
    (one sweep on a loaded 2-core machine can put a 2 ms latency into the p2p fit)."""
    from profiler.comm import bench_comm, fit_link

    sweeps = [bench_comm() for _ in range(max(1, repeats))]

    def pooled(table: str, model: str):
        pts: dict[tuple[float, float], list[float]] = {}
        for c in sweeps:
            for b, n, t in getattr(c, table)["intra"].points:
                pts.setdefault((b, n), []).append(t)
        return fit_link([[b, n, statistics.median(ts)] for (b, n), ts in sorted(pts.items())],
                        model)

    return CommProfile(p2p={"intra": pooled("p2p", "p2p")},
                       allreduce={"intra": pooled("allreduce", "ring")},
                       commit_s=statistics.median(c.commit_s for c in sweeps))


def with_comm(profile: Profile, comm: CommProfile) -> Profile:
    return replace(profile, comm=comm)


@dataclass
class Calibrated:
    """The cost model after calibration plus the fixed per-step overhead."""

    cost: CostModel
    overhead_s: float
    points: list[dict]

    def predict(self, plan: Plan):
        sim = simulate_plan(plan, self.cost)
        return sim.step_time_s + self.overhead_s, sim


KIND_OF = {"forward": "forward", "backward": "backward", "optimizer_step": "optimizer"}


@dataclass
class CalibrationState:
    """Every single-stage run so far: its per-kind factor (measured / modelled seconds,
    summed over the run: the step time is a sum of durations, so stalls count) and its
    residual step time. Factors are `planner.calibrate`'s median estimator over the
    `window` most recent runs (one run hit by a load burst does not carry over), the
    overhead the median residual of all runs."""

    window: int = 3
    residuals: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.factors = Calibration(CalibrationConfig(estimator="median", window=self.window))


def calibrate(mode: Mode, comm: CommProfile, counts: Sequence[int], steps: int, drop: int,
              log: Callable[[str], None], state: CalibrationState,
              what: str = "calibration") -> Calibrated:
    """Calibrate from single-stage (DP=1, PP=1) runs only, as the validation recipe of
    docs/performance-model.md does: each run's forward, backward and optimizer
    instructions give a factor per kind (seconds measured / modelled over the run); the
    cost model gets the median over the most recent runs (`CostModel.observe`); the fixed
    per-step overhead is what the calibrated simulator still misses on single-stage runs
    (median of measured - simulated step time over all of them): the commit protocol's
    store round trips beyond the one the profile holds, the leader's bookkeeping between
    steps, an optimizer step the profile does not time."""
    base = CostModel(with_comm(mode.profile, comm), CostConfig())
    mb = mode.microbatch_size
    runs = []
    for m in counts:
        c = Config(1, 1, m, (mode.num_layers,))
        meas = measure_step(mode, c, steps, drop, timeline=True)
        sums = {kind: [0.0, 0.0] for kind in KIND_OF.values()}  # measured, modelled
        for s in meas["ranks"][0]:
            for op, _, t0, t1 in s["ops"]:
                if op in KIND_OF:
                    pred = _uncalibrated(base, op, 0, mode.num_layers, mb)
                    if pred > 0:
                        sums[KIND_OF[op]][0] += t1 - t0
                        sums[KIND_OF[op]][1] += pred
        for kind, (measured, modelled) in sums.items():
            if modelled > 0:
                state.factors.observe(kind, modelled, measured)
        runs.append((m, c, meas))
    cost = CostModel(with_comm(mode.profile, comm), CostConfig())
    for kind, f in state.factors.factors().items():
        cost.observe(kind, 1.0, f)
    points = []
    for m, c, meas in runs:
        sim = simulate_plan(mode.plan(c), cost).step_time_s
        split = split_timeline(mode, c, cost, meas.pop("ranks"))
        points.append({"microbatches": m, "simulated_s": sim,
                       "residual_s": meas["median_s"] - sim, "split": split, **meas})
        state.residuals.append(meas["median_s"] - sim)
        log(f"  {what} 1x1 m{m}: measured {meas['median_s'] * 1e3:.1f} ms, calibrated "
            f"simulator {sim * 1e3:.1f} ms (load {meas['load']:.1f}; "
            f"{_split_line(split)}); commit {split['commit_s'] * 1e3:.2f} ms, optimizer "
            f"{split['leader_optimizer_s'] * 1e3:.2f} ms")
    return Calibrated(cost, statistics.median(state.residuals), points)


def _split_line(split: dict) -> str:
    cr = split["compute_ratio"]
    p2p = split["p2p_latency_s"]
    return (f"fwd x{cr['forward']:.3f} bwd x{cr['backward']:.3f}"
            + ("" if math.isnan(p2p) else f", p2p {p2p * 1e3:.2f} ms")
            + f", between steps {split['leader_outside_run_step_s'] * 1e3:.1f} ms")


def run_mode(mode: Mode, comm: CommProfile, args, log) -> dict:
    log(f"== {mode.name} mode: calibrating on single-stage runs")
    state = CalibrationState()
    cal = calibrate(mode, comm, args.calibration_microbatches, args.steps, args.drop, log,
                    state)
    factors = {k: cal.cost.factor(k) for k in ("forward", "backward", "optimizer")}
    log("  factors " + ", ".join(f"{k} x{v:.3f}" for k, v in factors.items())
        + f"; fixed per-step overhead {cal.overhead_s * 1e3:.1f} ms")
    configs = configurations(mode.num_layers, mode.skewed)
    if args.only:
        configs = [c for c in configs if any(s in c.label(mode.num_layers) for s in args.only)]
    order = list(configs)
    random.Random(args.seed).shuffle(order)  # load drift must not line up with shapes
    rows: dict[Config, dict] = {}
    if not args.skip_timing:
        for c in order:
            plan = mode.plan(c)
            pred_start, _ = cal.predict(plan)
            used = cal
            if args.interleave:  # a single-stage run right before: the machine as it is now
                used = calibrate(mode, comm, [args.interleave_microbatches], args.steps,
                                 args.drop, log, state, what="  interleaved")
            pred, sim = used.predict(plan)
            meas = measure_step(mode, c, args.steps, args.drop, timeline=True)
            split = split_timeline(mode, c, used.cost, meas.pop("ranks"))
            row = {"config": c.label(mode.num_layers), "dp": c.dp, "pp": c.pp,
                   "microbatches": c.microbatches, "partition": list(c.partition),
                   "predicted_s": pred, "predicted_start_s": pred_start,
                   "simulated_s": sim.step_time_s, "measured_s": meas["median_s"],
                   "error": pred / meas["median_s"] - 1,
                   "error_start": pred_start / meas["median_s"] - 1,
                   "factors": {k: used.cost.factor(k)
                               for k in ("forward", "backward", "optimizer")},
                   "overhead_s": used.overhead_s, "breakdown": sim.mean_breakdown(),
                   "measurement": meas, "split": split}
            rows[c] = row
            log(f"  {row['config']:<20} predicted {pred * 1e3:7.1f} ms  measured "
                f"{meas['median_s'] * 1e3:7.1f} ms  error {row['error']:+6.1%} "
                f"(start calibration {row['error_start']:+6.1%}; load {meas['load']:.1f}; "
                f"{_split_line(split)})")
    timing = [rows[c] for c in configs if c in rows]
    out = {"mode": mode.name, "profile": mode.profile.to_dict(),
           "microbatch_size": mode.microbatch_size,
           "calibration": {"factors": factors, "overhead_s": cal.overhead_s,
                           "points": cal.points, "report": cal.cost.calibration.report()},
           "timing": timing, "notes": mode.notes}
    if timing:
        p = [r["predicted_s"] for r in timing]
        m = [r["measured_s"] for r in timing]
        p0 = [r["predicted_start_s"] for r in timing]
        out["summary"] = {"configs": len(timing), "interleaved": args.interleave,
                          "mape": mape(p, m), "max_error": max_ape(p, m),
                          "mean_signed_error": statistics.mean(rel_errors(p, m)),
                          "kendall_tau": kendall_tau(p, m),
                          "start_calibration": {
                              "mape": mape(p0, m), "max_error": max_ape(p0, m),
                              "mean_signed_error": statistics.mean(rel_errors(p0, m)),
                              "kendall_tau": kendall_tau(p0, m)},
                          "mape_without_overhead": mape([r["simulated_s"] for r in timing],
                                                        m)}
        out["attribution"] = attribute(out, comm)
        if args.recheck:  # did the machine drift while the configurations ran?
            c = Config(1, 1, max(args.calibration_microbatches), (mode.num_layers,))
            pred, _ = cal.predict(mode.plan(c))
            meas = measure_step(mode, c, args.steps, args.drop, timeline=True)
            split = split_timeline(mode, c, cal.cost, meas.pop("ranks"))
            out["recheck"] = {"config": c.label(mode.num_layers), "predicted_s": pred,
                              "measured_s": meas["median_s"],
                              "error": pred / meas["median_s"] - 1, "measurement": meas,
                              "split": split}
            log(f"  recheck {c.label(mode.num_layers)}: predicted {pred * 1e3:.1f} ms, measured "
                f"{meas['median_s'] * 1e3:.1f} ms ({out['recheck']['error']:+.1%}; "
                f"{_split_line(split)})")
    if not args.skip_memory:
        out["memory"] = memory_rows(mode, cal.cost, configs, log)
    return out


def memory_rows(mode: Mode, cost: CostModel, configs: list[Config], log) -> list[dict]:
    log(f"== {mode.name} mode: memory (ranks as threads)")
    rows = []
    for c in configs:
        plan = mode.plan(c)
        sim = simulate_plan(plan, cost)
        formula = plan_memory(plan, cost.memory)
        model, data = mode.build()
        cfg = job_config(dp=c.dp, pp=c.pp, num_microbatches=c.microbatches,
                         microbatch_size=mode.microbatch_size, partition=c.partition,
                         mode=mode.name, log_every=1000, resume=False)
        with tempfile.TemporaryDirectory(prefix="model-accuracy-mem-") as d:
            measured = measure_memory(model, data, job_config(cfg, run_dir=d), c.ranks)
        for r in sorted(measured):
            pm = sim.ranks[r].memory
            meas = measured[r]
            row = {"config": c.label(mode.num_layers), "rank": r,
                   "stage": plan.stage_of(r)[1],
                   "predicted": {"params": pm.params, "grads": pm.grads,
                                 "optimizer": pm.optimizer, "activations": pm.activations,
                                 "total": pm.total},
                   "formula_total": formula[r].total, "measured": meas,
                   "error_total": pm.total / meas["peak_total"] - 1,
                   "error_categories": pm.total / meas["categories_total"] - 1,
                   "error_activations": (pm.activations / meas["activations"] - 1
                                         if meas["activations"] else float("nan"))}
            rows.append(row)
        worst = max(rows[-len(measured):], key=lambda x: abs(x["error_total"]))
        log(f"  {c.label(mode.num_layers):<22} worst rank {worst['rank']}: predicted "
            f"{worst['predicted']['total'] / 2**20:7.2f} MiB, measured peak "
            f"{worst['measured']['peak_total'] / 2**20:7.2f} MiB ({worst['error_total']:+.1%}), "
            f"activations {worst['predicted']['activations'] / 2**20:.2f} vs "
            f"{worst['measured']['activations'] / 2**20:.2f} MiB")
    return rows


def comm_from_dict(d: dict) -> CommProfile:
    from profiler.profile import LinkFit

    return CommProfile(p2p={k: LinkFit(**v) for k, v in d["p2p"].items()},
                       allreduce={k: LinkFit(**v) for k, v in d["allreduce"].items()},
                       commit_s=d["commit_s"])


def attribute(res: dict, comm: CommProfile) -> dict:
    """Error decomposition of one mode's timing rows (diagnostic: uses what each measured
    run itself showed, so these are *not* predictions). For every configuration the
    prediction is redone (a) with the forward/backward wall-time ratios measured in that
    run instead of the single-stage factors (per-op overhead as it was in that run), and
    (b) also with the p2p latency measured in that run instead of the comm sweep's fit.
    What error is left after (b) belongs to the model's structure (schedule, barriers,
    the fixed overhead carried over from single-stage runs)."""
    from profiler.profile import LinkFit

    profile = Profile.from_dict(res["profile"])
    rows, out = res["timing"], {}
    for name in ("per_op", "per_op_p2p"):
        errs = []
        for r in rows:
            sp = r["split"]
            cr = sp["compute_ratio"]
            c = comm
            if name == "per_op_p2p" and not math.isnan(sp["p2p_latency_s"]):
                fit = LinkFit(sp["p2p_latency_s"], 1e18, [], "measured in this run")
                c = replace(comm, p2p={"intra": fit})
            cost = CostModel(with_comm(profile, c))
            overhead = r.get("overhead_s", res["calibration"]["overhead_s"])
            opt = r.get("factors", res["calibration"]["factors"]).get("optimizer", 1.0)
            for kind, f in (("forward", cr["forward"]), ("backward", cr["backward"]),
                            ("optimizer", opt)):
                if not math.isnan(f):
                    cost.observe(kind, 1.0, f)
            plan = Plan.uniform(profile.num_layers, r["dp"], r["pp"], r["microbatches"],
                                int(res["microbatch_size"]), "1f1b", partition=r["partition"])
            pred = simulate_plan(plan, cost).step_time_s + overhead
            errs.append(pred / r["measured_s"] - 1)
            r.setdefault("attribution", {})[name] = pred / r["measured_s"] - 1
        out[name] = {"mape": statistics.mean(abs(e) for e in errs),
                     "max_error": max(abs(e) for e in errs),
                     "mean_signed_error": statistics.mean(errs)}
    return out


# ---- reporting ----------------------------------------------------------------------
def tables(results: dict) -> str:
    lines = []
    for name, res in results["modes"].items():
        cal = res["calibration"]
        timing = res.get("timing")
        if timing:
            lines.append(f"\n### {name} mode: step time\n")
            lines.append("calibration (single-stage runs only): factors "
                         + ", ".join(f"{k} x{v:.3f}" for k, v in cal["factors"].items())
                         + f"; fixed per-step overhead {cal['overhead_s'] * 1e3:.1f} ms; runs "
                         + ", ".join(f"1x1 m{p['microbatches']} {p['median_s'] * 1e3:.1f} ms"
                                     for p in cal["points"]) + "\n")
            s = res["summary"]
            head = "interleaved calibration" if s["interleaved"] else "start calibration"
            lines.append(f"| config | ranks | predicted ms ({head}) | measured ms | error "
                         "| predicted ms (start calibration) | error | load "
                         "| run's fwd / bwd factor (cal.) | p2p latency ms "
                         "| commit: comm wait / vote ms |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in timing:
                sp = r["split"]
                cr = sp["compute_ratio"]
                f = r.get("factors", cal["factors"])
                p2p = sp["p2p_latency_s"]
                lines.append(
                    f"| {r['config']} | {r['dp'] * r['pp']} | {r['predicted_s'] * 1e3:.1f} "
                    f"| {r['measured_s'] * 1e3:.1f} | {r['error']:+.1%} "
                    f"| {r['predicted_start_s'] * 1e3:.1f} | {r['error_start']:+.1%} "
                    f"| {r['measurement']['load']:.1f} "
                    f"| {cr['forward']:.3f} / {cr['backward']:.3f} ({f['forward']:.3f} / "
                    f"{f['backward']:.3f}) "
                    f"| {'-' if math.isnan(p2p) else f'{p2p * 1e3:.2f}'} "
                    f"| {sp['commit_comm_wait_s'] * 1e3:.1f} / {sp['commit_vote_s'] * 1e3:.1f} |")
            st = s["start_calibration"]
            lines.append(f"\n{head}: MAPE {s['mape']:.1%}, max {s['max_error']:.1%}, mean "
                         f"signed {s['mean_signed_error']:+.1%}, Kendall tau "
                         f"{s['kendall_tau']:.3f} over {s['configs']} configurations; start "
                         f"calibration only: MAPE {st['mape']:.1%}, max {st['max_error']:.1%}, "
                         f"mean signed {st['mean_signed_error']:+.1%}, Kendall tau "
                         f"{st['kendall_tau']:.3f}")
            rc = res.get("recheck")
            if rc:
                lines.append(f"\nrecheck {rc['config']} after the sweep: predicted "
                             f"{rc['predicted_s'] * 1e3:.1f} ms, measured "
                             f"{rc['measured_s'] * 1e3:.1f} ms ({rc['error']:+.1%}; "
                             f"{_split_line(rc['split'])})")
            at = res.get("attribution")
            if at:
                lines.append("\nerror decomposition (diagnostic, uses each run's own "
                             "timings): with the per-op wall/profile ratios of the run "
                             f"itself MAPE {at['per_op']['mape']:.1%} (max "
                             f"{at['per_op']['max_error']:.1%}, mean signed "
                             f"{at['per_op']['mean_signed_error']:+.1%}); also with its "
                             f"measured p2p latency MAPE {at['per_op_p2p']['mape']:.1%} "
                             f"(max {at['per_op_p2p']['max_error']:.1%}, mean signed "
                             f"{at['per_op_p2p']['mean_signed_error']:+.1%})")
        mem = res.get("memory")
        if mem:
            lines.append(f"\n### {name} mode: memory per rank (KiB)\n")
            lines.append("| config | rank | stage | predicted | measured (categories) | error "
                         "| measured simultaneous peak | error | predicted act. "
                         "| measured act. | act. error |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            kib = 1024.0
            for r in mem:
                m = r["measured"]
                lines.append(
                    f"| {r['config']} | {r['rank']} | {r['stage']} "
                    f"| {r['predicted']['total'] / kib:.1f} "
                    f"| {m['categories_total'] / kib:.1f} | {r['error_categories']:+.1%} "
                    f"| {m['peak_total'] / kib:.1f} | {r['error_total']:+.1%} "
                    f"| {r['predicted']['activations'] / kib:.1f} "
                    f"| {m['activations'] / kib:.1f} | {r['error_activations']:+.1%} |")
            lines.append("\n" + memory_summary(mem))
    return "\n".join(lines)


def memory_summary(mem: list[dict]) -> str:
    cat = [abs(r["error_categories"]) for r in mem]
    peak = [abs(r["error_total"]) for r in mem]
    act = [abs(r["error_activations"]) for r in mem if not math.isnan(r["error_activations"])]
    return (f"{len(mem)} ranks: total vs measured categories mean |error| "
            f"{statistics.mean(cat):.1%}, max {max(cat):.1%}; vs simultaneous peak mean "
            f"{statistics.mean(peak):.1%}, max {max(peak):.1%}; activations mean "
            f"{statistics.mean(act):.1%}, max {max(act):.1%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="emulated,real")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--drop", type=int, default=3, help="warm-up steps left out")
    ap.add_argument("--calibration-microbatches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--only", nargs="*", default=[], help="config label substrings")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--comm-repeats", type=int, default=3,
                    help="comm sweeps whose per-point medians are fitted")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="before each configuration, one more single-stage run re-measures "
                         "the per-op factors (the load of a shared machine drifts)")
    ap.add_argument("--interleave-microbatches", type=int, default=2)
    ap.add_argument("--recheck", action=argparse.BooleanOptionalAction, default=True,
                    help="re-measure the largest calibration run after the sweep (drift)")
    ap.add_argument("--seed", type=int, default=0, help="measurement order shuffle")
    ap.add_argument("--out", default=str(out_dir() / "model_accuracy.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    log(f"load average {os.getloadavg()}; comm sweep x{args.comm_repeats}")
    comm = comm_sweep(args.comm_repeats)
    log(f"  p2p alpha {comm.p2p['intra'].alpha_s * 1e6:.0f} us, all-reduce alpha "
        f"{comm.allreduce['intra'].alpha_s * 1e6:.0f} us, commit {comm.commit_s * 1e6:.0f} us")
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
               "machine": {"cpus": os.cpu_count(), "load_start": os.getloadavg(),
                           "torch": torch.__version__},
               "comm": asdict(comm), "modes": {}}
    for name in args.modes.split(","):
        mode = emulated_mode() if name == "emulated" else real_mode()
        results["modes"][name] = run_mode(mode, comm, args, log)
        results["machine"]["load_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.time() - t_start
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(tables(results))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

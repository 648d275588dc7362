"""Render a run as a PNG: loss and throughput over time, failures, MTTR by phase.

    odyssey report RUN_DIR [-o RUN_DIR/report.png] [--width 12 --height 9 --dpi 100]

Reads RUN_DIR/report.json, metrics.jsonl and (if present) events.jsonl, validates every
field it uses (errors name the file, line and field), and draws three panels:

1. loss per committed step against wall time since the run started;
2. samples/s per step (dots) and its running median (line);
3. MTTR of each recovery as a stacked (horizontal) bar of its phases (detect, agree,
   plan, rebuild, migrate, first_step), labelled with the plan chosen.

Each recovery is a shaded span on panels 1-2, from the fault (the event's log time minus
the redone step and the MTTR) to the moment the survivors run the new plan, annotated
with who was lost, the plan chosen and the candidates it beat; a resume from a
checkpoint is a dashed line; a re-plan around a straggler (a recovery with cause
"replan") is shaded orange instead of red; a straggler found (or cleared) is a dotted orange line on
panel 2 naming the rank and its slowdown. matplotlib (Agg) is imported only when
rendering.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from odyssey import contract

PHASES = ("detect", "agree", "plan", "rebuild", "migrate", "first_step")
STRAGGLER_KINDS = ("straggler", "straggler_cleared")
_NUM = (int, float)


class ReportError(ValueError):
    """A run directory whose files do not hold what the plot needs."""


# ---- validation ----------------------------------------------------------------------
def _need(rec: dict, key: str, types: tuple, where: str, optional: bool = False):
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise ReportError(f"{where}: missing field '{key}'")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in types)
        raise ReportError(f"{where}: field '{key}' must be {names}, got {value!r}")
    return value


def validate_event(ev: object, where: str) -> dict:
    if not isinstance(ev, dict):
        raise ReportError(f"{where}: an event must be an object, got {ev!r}")
    kind = _need(ev, "kind", (str,), where)
    _need(ev, "time", _NUM, where)
    if kind == "recovery":
        for key in ("generation", "step", "resume_step"):
            _need(ev, key, (int,), where)
        for key in ("mttr_s", "redone_step_s"):
            _need(ev, key, _NUM, where)
        _need(ev, "chosen", (str,), where)
        for key in ("ranks_lost", "newcomers"):
            _need(ev, key, (list,), where)
        phases = _need(ev, "phases", (dict,), where)
        for p in PHASES:
            _need(phases, p, _NUM, f"{where}.phases")
    elif kind == "resume":
        _need(ev, "checkpoint_step", (int,), where)
    elif kind in STRAGGLER_KINDS:
        for key in ("step", "rank", "since_step"):
            _need(ev, key, (int,), where)
        _need(ev, "factor", _NUM, where)
    return ev


def validate_report(report: object, name: str = "report.json") -> dict:
    if not isinstance(report, dict):
        raise ReportError(f"{name}: must be a JSON object")
    _need(report, "mode", (str,), name)
    for key in ("world_size", "steps", "global_batch"):
        _need(report, key, (int,), name)
    samples = _need(report, "samples", (dict,), name)
    for key in ("expected", "trained", "lost", "duplicated"):
        _need(samples, key, (int,), f"{name}: samples")
    loss = _need(report, "loss", (dict,), name)
    for key in ("first", "final"):
        _need(loss, key, _NUM, f"{name}: loss", optional=True)
    events = _need(report, "events", (list,), name)
    for i, ev in enumerate(events):
        validate_event(ev, f"{name}: events[{i}]")
    return report


def read_jsonl_checked(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path.name} line {n}: not JSON ({e})") from None
    return out


def load_run(run_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """(report, metrics, events) of a run directory, validated."""
    d = Path(run_dir)
    path = d / contract.REPORT_FILE
    if not path.exists():
        raise ReportError(f"{path} does not exist (is {d} a finished run's directory?)")
    try:
        report = validate_report(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ReportError(f"report.json: not JSON ({e})") from None
    mpath = d / contract.METRICS_FILE
    if not mpath.exists():
        raise ReportError(f"{mpath} does not exist")
    metrics = read_jsonl_checked(mpath)
    for n, m in enumerate(metrics, 1):
        where = f"metrics.jsonl line {n}"
        if not isinstance(m, dict):
            raise ReportError(f"{where}: must be an object")
        _need(m, "step", (int,), where)
        _need(m, "time", _NUM, where)
        _need(m, "loss", _NUM, where)
        _need(m, "samples_per_s", _NUM, where, optional=True)
        _need(m, "step_time_s", _NUM, where, optional=True)
    if not metrics:
        raise ReportError("metrics.jsonl: no steps recorded")
    events = report["events"]
    epath = d / contract.EVENTS_FILE
    if epath.exists():  # the source the report copied; validate it too and prefer it
        events = [validate_event(ev, f"events.jsonl line {n}")
                  for n, ev in enumerate(read_jsonl_checked(epath), 1)]
    return report, sorted(metrics, key=lambda m: m["step"]), events


# ---- drawing -------------------------------------------------------------------------
def fault_window(ev: dict, t0: float) -> tuple[float, float]:
    """(fault, recovered) seconds since t0 for a recovery event."""
    recovered = ev["time"] - ev["redone_step_s"] - t0
    return recovered - ev["mttr_s"], recovered


def _running_median(values: list[float], k: int = 5) -> list[float]:
    return [statistics.median(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def render(run_dir: str | Path, out: str | Path | None = None, width: float = 12.0,
           height: float = 9.0, dpi: int = 100) -> Path:
    """Validate the run and write the PNG; returns its path."""
    report, metrics, events = load_run(run_dir)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out) if out else Path(run_dir) / "report.png"
    t0 = metrics[0]["time"] - (metrics[0].get("step_time_s") or 0.0)
    t = [m["time"] - t0 for m in metrics]
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_loss, ax_tp, ax_mttr = fig.subplots(3, 1, gridspec_kw={"height_ratios": [3, 3, 2.4]})
    s = report["samples"]
    loss = report["loss"]
    span = (f"loss {loss['first']:.3f} -> {loss['final']:.3f}, "
            if loss.get("first") is not None and loss.get("final") is not None else "")
    fig.suptitle(f"{report.get('model', 'run')}: {report['mode']} compute, "
                 f"{report['world_size']} ranks, {report['steps']} steps x "
                 f"{report['global_batch']} samples, {span}samples lost {s['lost']}, "
                 f"duplicated {s['duplicated']}", fontsize=11)

    ax_loss.plot(t, [m["loss"] for m in metrics], color="tab:blue", lw=1.5)
    ax_loss.set_ylabel("loss")
    pts = [(ti, m["samples_per_s"]) for ti, m in zip(t, metrics) if m.get("samples_per_s")]
    if pts:
        xs, ys = zip(*pts)
        ax_tp.plot(xs, ys, ".", color="tab:green", ms=4, alpha=0.6, label="per step")
        ax_tp.plot(xs, _running_median(list(ys)), color="tab:green", lw=1.5,
                   label="running median (5)")
        ax_tp.legend(loc="lower right", fontsize=8)
    ax_tp.set_ylabel("samples/s")
    ax_tp.set_xlabel("seconds since the first step started")

    recoveries = [e for e in events if e["kind"] == "recovery"]
    for i, ev in enumerate(recoveries):
        start, end = fault_window(ev, t0)
        who = ev["ranks_lost"] or ev["newcomers"]
        what = "lost" if ev["ranks_lost"] else "joined"
        label = f"gen {ev['generation']}: rank(s) {who} {what} -> {ev['chosen']}"
        colour = "tab:red"
        if ev.get("cause") == "replan":  # the leader's own switch around a straggler
            label, colour = f"gen {ev['generation']}: re-plan -> {ev['chosen']}", "tab:orange"
        others = sorted({c.get("kind") for c in ev.get("candidates") or []
                         if isinstance(c, dict) and c.get("kind") != ev["chosen"]} - {None})
        if others:
            label += f" (over {', '.join(others)})"
        for ax in (ax_loss, ax_tp):
            ax.axvspan(start, max(end, start + 1e-3), color=colour, alpha=0.25, lw=0)
            ax.axvline(start, color=colour, lw=1)
        ax_tp.annotate(label, (start, 1.0), xycoords=("data", "axes fraction"),
                       xytext=(3, -12 - 11 * (i % 3)), textcoords="offset points",
                       fontsize=8, color="tab:red")
    for ev in events:
        if ev["kind"] == "resume":
            x = ev["time"] - t0
            for ax in (ax_loss, ax_tp):
                ax.axvline(x, color="tab:purple", ls="--", lw=1)
            ax_loss.annotate(f"resume from step {ev['checkpoint_step']}", (x, 1.0),
                             xycoords=("data", "axes fraction"), xytext=(3, -12),
                             textcoords="offset points", fontsize=8, color="tab:purple")

    slow = [e for e in events if e["kind"] in STRAGGLER_KINDS]
    for i, ev in enumerate(slow):
        x = ev["time"] - t0
        ax_tp.axvline(x, color="tab:orange", ls=":", lw=1.5)
        text = (f"rank {ev['rank']} cleared" if ev["kind"] == "straggler_cleared" else
                f"rank {ev['rank']} {ev['factor']:.1f}x slow since step {ev['since_step']}")
        ax_tp.annotate(text, (x, 0.0), xycoords=("data", "axes fraction"),
                       xytext=(3, 4 + 11 * (i % 3)), textcoords="offset points",
                       fontsize=8, color="tab:orange")

    if recoveries:
        colors = ("tab:red", "tab:orange", "tab:olive", "tab:cyan", "tab:blue", "tab:gray")
        names = [f"gen {e['generation']}: {e['chosen']}" for e in recoveries]
        left = [0.0] * len(recoveries)
        for phase, color in zip(PHASES, colors):
            ms = [max(0.0, e["phases"][phase]) * 1e3 for e in recoveries]
            ax_mttr.barh(names, ms, left=left, color=color, label=phase, height=0.6)
            left = [a + v for a, v in zip(left, ms)]
        for y, e in enumerate(recoveries):
            ax_mttr.annotate(f" MTTR {e['mttr_s'] * 1e3:.0f} ms", (left[y], y), va="center",
                             fontsize=8)
        ax_mttr.set_xlim(0, max(left) * 1.2 or 1.0)
        ax_mttr.set_ylim(-0.6, len(recoveries) - 0.4 + 0.6)
        ax_mttr.invert_yaxis()
        ax_mttr.legend(ncol=6, fontsize=8, loc="lower right")
        ax_mttr.set_xlabel("MTTR by phase (ms)")
    else:
        ax_mttr.text(0.5, 0.5, "no recoveries in this run", ha="center", va="center",
                     transform=ax_mttr.transAxes)
        ax_mttr.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # no bbox 'tight': the pixel size is width x height x dpi
    return out


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ReportError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="odyssey report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("run_dir", help="a run directory (with report.json and metrics.jsonl)")
    p.add_argument("-o", "--out", help="PNG to write (default: RUN_DIR/report.png)")
    p.add_argument("--width", type=float, default=12.0, help="inches (default: 12)")
    p.add_argument("--height", type=float, default=9.0, help="inches (default: 9)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch (default: 100)")
    a = p.parse_args(argv)
    try:
        path = render(a.run_dir, a.out, a.width, a.height, a.dpi)
    except ReportError as e:
        print(f"odyssey report: error: {e}", file=sys.stderr)
        return 1
    w, h = png_size(path)
    print(f"wrote {path} ({w}x{h} px)")
    return 0

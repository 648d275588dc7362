"""Print a short human summary of a run's report.json: `python -m odyssey.summary PATH`."""

from __future__ import annotations

import json
import sys

from profiler.units import format_size


def summarize(report: dict) -> str:
    s, loss = report["samples"], report["loss"]
    lines = [
        f"mode           {report['mode']} compute, world size {report['world_size']}, "
        f"{len(report['plan']['pipelines'])} pipeline(s), {report.get('schedule', '?')}",
        f"steps          {report['steps']} x global batch {report['global_batch']}",
        f"loss           {loss['first']:.4f} -> {loss['final']:.4f}",
        f"samples        expected {s['expected']}, trained {s['trained']}, lost {s['lost']}, "
        f"duplicated {s['duplicated']}",
        f"throughput     {report['throughput_samples_per_s']:.1f} samples/s, "
        f"median step {report['step_time_s'] * 1e3:.1f} ms",
    ]
    for e in report.get("events", []):
        if e["kind"] == "resume":
            lines.append(f"resume         from the checkpoint of step {e['checkpoint_step']} "
                         f"(attempt {e.get('attempt', 0)})")
            continue
        if e["kind"] in ("straggler", "straggler_cleared"):
            kind = "cleared" if e["kind"] == "straggler_cleared" else "straggler"
            lines.append(f"{kind:<15}gen {e.get('generation', 0)} step {e['step']}: rank "
                         f"{e['rank']} {e['factor']:.1f}x its {e['reference']} (since step "
                         f"{e['since_step']})")
            continue
        if e["kind"] == "mitigation" and e["chosen"] != "keep":
            slow = ", ".join(f"rank {r} {f:.1f}x" for r, f in e["stragglers"].items())
            lines.append(f"mitigation     gen {e['generation']} step {e['step']}: "
                         f"{slow or 'no straggler left'} -> {e['chosen']} ({e['note']}), "
                         f"predicted step {e['keep_predicted_step_s'] * 1e3:.0f} -> "
                         f"{e['predicted_step_s'] * 1e3:.0f} ms")
            continue
        if e["kind"] == "mitigation_result":
            lines.append(f"               measured {e['measured_step_s'] * 1e3:.0f} ms "
                         f"(predicted {e['predicted_step_s'] * 1e3:.0f} ms) from gen "
                         f"{e['generation']}")
            continue
        if e["kind"] == "recovery_result":
            swaps = "".join(f", rank {r} swapped to {format_size(v['peak_resident'])} of "
                            f"{format_size(v['budget'])}" for r, v in e["swapping"].items())
            lines.append(f"               measured {e['measured_step_s'] * 1e3:.0f} ms "
                         f"(predicted {e['predicted_step_s'] * 1e3:.0f} ms) over "
                         f"{e['steps']} steps of gen {e['generation']}{swaps}")
            continue
        if e["kind"] != "recovery":
            continue
        if e["cause"] == "replan":
            lines.append(f"re-plan        gen {e['generation']} at step {e['step']}: "
                         f"{e['chosen']}, switch {e['mttr_s'] * 1e3:.0f} ms")
            continue
        who = e["ranks_lost"] or e["newcomers"]
        ph = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in e["phases"].items())
        what = ("two-phase switch" if e["cause"] == "switch"
                else f"{e['cause']} of rank(s) {who}")
        lines.append(f"recovery       gen {e['generation']}: {what} at "
                     f"step {e['step']}" + (f" ({e['phase']})" if e.get("phase") else "")
                     + f" -> {e['chosen']} (policy {e['policy']}), MTTR "
                     f"{e['mttr_s'] * 1e3:.0f} ms [{ph} ms]")
        if "measured_transition_s" in e:
            lines.append(f"               transition predicted "
                         f"{e['predicted_transition_s'] * 1e3:.0f} ms "
                         f"({e['transfer_rounds']} transfer rounds), measured "
                         f"{e['measured_transition_s'] * 1e3:.0f} ms (rebuild + migrate)")
        if e.get("two_phase"):
            t = e["two_phase"]
            lines.append(f"               behind: {t['then']} {t['then_pipelines']}, "
                         f"{t['background_moved_bytes'] / 1e6:.1f} MB copied while training, "
                         f"predicted {t['predicted_background_s'] * 1e3:.0f} ms")
        if e.get("background"):
            b = e["background"]
            pred = b["predicted_s"]
            lines.append(f"               background copy measured "
                         f"{b['measured_s'] * 1e3:.0f} ms"
                         + (f" (predicted {pred * 1e3:.0f} ms)" if pred else "")
                         + f", {b['steps']} step(s) trained meanwhile")
        for c in e["candidates"][:6]:
            lines.append(f"                 {c['kind']:>14}: transition "
                         f"{c['predicted_transition_s'] * 1e3:7.1f} ms, step "
                         f"{c['predicted_step_s'] * 1e3:7.1f} ms, score {c['score']:10.0f}"
                         f"  {c['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m odyssey.summary RUN_DIR/report.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read report {argv[0]}: {e}", file=sys.stderr)
        return 1
    print(summarize(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

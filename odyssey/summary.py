"""Print a short human summary of a run's report.json: `python -m odyssey.summary PATH`."""

from __future__ import annotations

import json
import sys


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
        f"events         {len(report.get('events', []))}",
    ]
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

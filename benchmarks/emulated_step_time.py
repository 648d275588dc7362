"""Emulated compute: does the measured step time track the configured layer durations?

Each layer sleeps for its configured forward/backward time on tiny real tensors; ranks,
groups, sends, all-reduces and commits are real. For uniform stages, 1F1B's ideal step
time is (m + p - 1) x (f + b) per stage with m microbatches per pipeline; the difference
is the runtime's own overhead (p2p hops, all-reduce, commit, Python).

    python benchmarks/emulated_step_time.py            # 8 ranks, several DP x PP
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import launch, out_dir, step_times  # noqa: E402


def ideal_1f1b_s(layers: int, dp: int, pp: int, mbs: int, fwd_ms: float, bwd_ms: float) -> float:
    per_stage = layers // pp * (fwd_ms + bwd_ms) / 1e3
    return (mbs // dp + pp - 1) * per_stage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="2x4,1x8,4x2,8x1",
                    help="comma-separated DPxPP shapes (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--forward-ms", type=float, default=10.0)
    ap.add_argument("--backward-ms", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped from the median")
    ap.add_argument("--launcher", choices=["odyssey", "torchrun"], default="odyssey")
    ap.add_argument("--out", default=str(out_dir() / "emulated.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"emulated compute, {args.layers} layers, fwd {args.forward_ms} ms / bwd "
          f"{args.backward_ms} ms per layer per microbatch, {args.microbatches} microbatches")
    print(f"{'DPxPP':>6} {'ranks':>5} {'ideal ms':>9} {'measured ms':>12} {'overhead':>9}")
    for shape in args.configs.split(","):
        dp, pp = (int(x) for x in shape.lower().split("x"))
        with tempfile.TemporaryDirectory() as d:
            run_dir = Path(d) / "run"
            t0 = time.time()
            report = launch(dp * pp, run_dir, [
                "--mode", "emulated", "--dp", str(dp), "--pp", str(pp),
                "--steps", str(args.steps), "--num-microbatches", str(args.microbatches),
                "--microbatch-size", "2", "--log-every", "1000",
                "--emu-num-layers", str(args.layers),
                "--emu-forward-ms", str(args.forward_ms),
                "--emu-backward-ms", str(args.backward_ms)], args.launcher)
            measured = statistics.median(step_times(run_dir, args.warmup))
        ideal = ideal_1f1b_s(args.layers, dp, pp, args.microbatches, args.forward_ms,
                             args.backward_ms)
        row = {"dp": dp, "pp": pp, "ranks": dp * pp, "ideal_s": ideal, "measured_s": measured,
               "overhead": measured / ideal - 1, "mode": report["mode"],
               "wall_s": time.time() - t0, "samples": report["samples"]}
        rows.append(row)
        print(f"{shape:>6} {dp * pp:>5} {ideal * 1e3:9.1f} {measured * 1e3:12.1f} "
              f"{row['overhead']:+8.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows,
                                          "args": vars(args)}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

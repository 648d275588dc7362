"""Measure the example GPT's serving profile (dense, attention, head, overhead tables).

    python examples/profile_serving.py --out serving_profile.json      # ~1 min, 1 thread
    python examples/profile_serving.py --quick --out /tmp/sp.json      # small grids

The model is `examples.gpt_kv.KVCacheGPT`; the measuring is `profiler.serving_profiler`,
which takes the model as an argument (the profiler imports nothing of the examples).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt_kv import KVCacheGPT, ServeModelConfig  # noqa: E402
from profiler.serving import ServingProfileError  # noqa: E402
from profiler.serving_profiler import CLOCKS, ServingProfilerConfig, profile_serving  # noqa: E402
from profiler.timing import TimingConfig  # noqa: E402

QUICK = ServingProfilerConfig(
    rounds=1, dense_tokens=(1, 16, 64, 256), prefill_lens=(1, 32, 128), decode_batch=(1, 4, 8),
    decode_kv=(16, 64, 128), head_rows=(1, 8, 16), calibration_batches=4, wake_samples=2,
    timing=TimingConfig(warmup=1, repeats=3))
"""The --quick grids (tests, smoke runs)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure the KV-cache GPT's serving tables "
                                             "(dense, attention, head, overhead) as JSON.")
    ap.add_argument("--out", default="serving_profile.json", help="output JSON path")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--n-blocks", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per point")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                    help="thread: CPU time of the thread (robust on a shared CPU); wall")
    ap.add_argument("--quick", action="store_true", help="small grids (tests, smoke runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = KVCacheGPT(ServeModelConfig(context=args.context, d_model=args.d_model,
                                        n_heads=args.n_heads, n_blocks=args.n_blocks),
                       max_slots=40)  # largest decode batch + calibration prefills
    cfg = ServingProfilerConfig(timing=TimingConfig(warmup=2, repeats=args.repeats),
                                clock=args.clock)
    if args.quick:
        cfg = replace(QUICK, clock=args.clock)
    try:
        prof = profile_serving(model, cfg)
    except ServingProfileError as e:
        print(f"profile_serving: {e}", file=sys.stderr)
        return 2
    prof.save(args.out)
    print(f"wrote {args.out}: kv {prof.kv_bytes_per_token:.0f} B/token, overhead "
          f"{prof.overhead_s * 1e3:.3f} ms + {prof.overhead_per_request_s * 1e6:.1f} us/request"
          f", wake after idle {prof.wake_s * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a memory-streaming process on the other core slow the serving step (in CPU time)?

    flock /tmp/odyssey-bench.lock .venv/bin/python benchmarks/serving_contention.py

Times three iteration shapes of the served GPT on the thread CPU-time clock, alternately
alone and while a second process copies a 64 MiB array in a loop (it evicts the shared
L3 cache and takes memory bandwidth, without taking this thread's core). A slowdown here
is one that neither the wall clock nor the CPU-time clock of the server can factor out:
the drift of wall-clock serving replays on a shared machine (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt_kv import KVCacheGPT, ServeModelConfig  # noqa: E402
from profiler.serving_profiler import time_batch, time_median  # noqa: E402
from profiler.timing import TimingConfig  # noqa: E402

SHAPES = (("decode x1", [], [128]), ("decode x3", [], [128] * 3), ("prefill 128", [128], []))
STREAM = ("import numpy as np, time\na = np.ones(1 << 23); b = np.empty_like(a)\n"
          "t = time.time()\nwhile time.time() - t < {s}: np.copyto(b, a)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2, help="(alone, contended) pairs")
    ap.add_argument("--stream-s", type=float, default=8.0,
                    help="seconds the streaming process runs per contended phase")
    ap.add_argument("--out", default="", help="optional JSON output path")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = KVCacheGPT(ServeModelConfig(), max_slots=8)
    gen = torch.Generator().manual_seed(0)
    timing = TimingConfig(warmup=2, repeats=15)

    def tokens(n: int):
        return torch.randint(0, model.cfg.vocab_size, (n,), generator=gen)

    def measure() -> dict:
        return {name: time_batch(model, pre, dec, tokens,
                                 lambda fn: time_median(fn, timing, "thread"))
                for name, pre, dec in SHAPES}

    out = {"loadavg_before": os.getloadavg(), "phases": []}
    for i in range(2 * args.pairs):
        contended = i % 2 == 1
        proc = None
        if contended:
            proc = subprocess.Popen([sys.executable, "-c", STREAM.format(s=args.stream_s)])
            time.sleep(0.5)  # let it start streaming
        try:
            got = measure()
        finally:
            if proc:
                proc.wait()
        out["phases"].append({"contended": contended, "cpu_s": got})
        print(("contended" if contended else "alone    ") + "  " + "  ".join(
            f"{k} {v * 1e3:.3f} ms" for k, v in got.items()), flush=True)
    out["loadavg_after"] = os.getloadavg()
    print(f"loadavg before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

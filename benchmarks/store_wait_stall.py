"""A torch TCPStore hazard the control plane must design around: `wait(keys, timeout)`
with a short timeout, looped, can stall for seconds after the key was set.

N processes run S "steps": each adds itself to a counter, the last one sets a decision key
after a short random delay (a commit), and everyone waits for that key — either by
looping `store.wait([key], --wait-ms)` (how odyssey's commit, agreement and decision
waits poll today) or by looping `store.check([key])` with a short sleep. It prints, for
both, the wall time of the run and the worst single wait. Real processes, loopback.

    python benchmarks/store_wait_stall.py [--procs 8] [--steps 40] [--wait-ms 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def worker(i: int, port: int, args, how: str, out: str) -> None:
    st = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    worst = 0.0
    for s in range(args.steps):
        key = f"{how}/dec/{s}"
        if st.add(f"{how}/cnt/{s}", 1) == args.procs:
            time.sleep(random.random() * 0.05)
            st.compare_set(key, "", "commit")
        t0 = time.monotonic()
        while True:
            if how == "wait":
                try:
                    st.wait([key], timedelta(milliseconds=args.wait_ms))
                    break
                except dist.DistStoreError:
                    continue
            if st.check([key]):
                break
            time.sleep(0.002)
        worst = max(worst, time.monotonic() - t0)
        if i == 1:  # one rank lags a little, so the others' waits time out and retry
            time.sleep(random.random() * 0.09)
    Path(out).write_text(json.dumps(worst))


def run(args, how: str, port: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        outs = [str(Path(d) / f"{i}.json") for i in range(args.procs)]
        ps = [mp.Process(target=worker, args=(i, port, args, how, outs[i]))
              for i in range(args.procs)]
        t0 = time.monotonic()
        for p in ps:
            p.start()
        for p in ps:
            p.join(args.timeout_s)
        took = time.monotonic() - t0
        for p in ps:
            p.kill()
        worst = [json.loads(Path(o).read_text()) for o in outs if Path(o).exists()]
    return {"how": how, "wall_s": took, "worst_wait_s": max(worst, default=None),
            "finished": len(worst)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--wait-ms", type=int, default=20, help="timeout of each wait call")
    ap.add_argument("--timeout-s", type=float, default=300)
    args = ap.parse_args()
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for how in ("check", "wait"):
        r = run(args, how, master.port)
        print(f"{how:6} {args.steps} steps in {r['wall_s']:6.1f} s, worst wait "
              f"{r['worst_wait_s']:.3f} s ({r['finished']}/{args.procs} finished)", flush=True)


if __name__ == "__main__":
    main()

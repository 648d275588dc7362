"""Serve the example GPT on CPU with continuous batching and a KV cache, replaying a trace.

    python examples/serve_gpt.py --trace-rate 6 --trace-num-requests 60 --out-dir /tmp/serve
    python examples/serve_gpt.py --trace-file trace.jsonl --out-dir /tmp/serve

Requests arrive in real time (wall clock since start) from a trace: a JSONL file of
{rid, arrival_s, prompt_len, output_len} or one generated from --trace-* options. The
batching decisions come from `planner.serving.batching.Scheduler`, the one the estimator
simulates. Writes `iterations.jsonl` (one row per iteration: start, duration, the
thread's CPU time in it, whether it followed an idle wait, batch shape),
`requests.jsonl` (TTFT, TPOT per request) and `summary.json` to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt_kv import KVCacheGPT, ServeModelConfig  # noqa: E402
from planner.serving.batching import (  # noqa: E402
    Request,
    Scheduler,
    SchedulerConfig,
    TraceConfig,
    TraceResult,
    generate_requests,
)
from profiler.configtree import add_dataclass_args, from_args  # noqa: E402


@dataclass(frozen=True)
class ServerConfig:
    """The server process."""

    trace_file: str = ""
    """JSONL request trace; empty: generate one from the --trace-* options."""
    out_dir: str = "serve_out"
    """Where iterations.jsonl, requests.jsonl and summary.json go."""
    threads: int = 1
    """torch intra-op threads (1 on a shared CPU)."""
    warmup_iterations: int = 3
    """Untimed iterations before the trace starts (lazy init, allocator)."""
    clock: str = "wall"
    """'wall': requests arrive and are timed in real time. 'cpu': a virtual clock that
    advances by the serving thread's CPU time per iteration and jumps to the next arrival
    when idle, i.e. the latencies of a dedicated core, immune to other processes on a
    shared machine (the model really runs either way)."""


def load_trace(path: str | Path) -> list[Request]:
    """Requests from a JSONL file; a clear error names the bad line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Request(int(d["rid"]), float(d["arrival_s"]), int(d["prompt_len"]),
                               int(d["output_len"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i}: bad request line ({type(e).__name__}: {e})") from e
    return out


def prompt_tokens(requests: list[Request], vocab: int, seed: int = 0) -> dict:
    """The prompt of each request: seeded random tokens (the trace has lengths only)."""
    gen = torch.Generator().manual_seed(seed)
    return {r.rid: torch.randint(0, vocab, (r.prompt_len,), generator=gen) for r in requests}


def serve(model: KVCacheGPT, requests: list[Request], sched: SchedulerConfig,
          warmup_iterations: int = 3, seed: int = 0, clock: str = "wall") -> TraceResult:
    """Replay `requests` (in real time, or on the CPU-time clock, see `ServerConfig`);
    return per-request records and one row per iteration."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"unknown clock {clock!r}; expected 'wall' or 'cpu'")
    prompts = prompt_tokens(requests, model.cfg.vocab_size, seed)
    _warm_up(model, warmup_iterations)
    scheduler = Scheduler(requests, sched, max_context=model.cfg.context)
    last: dict[int, int] = {}
    rows = []
    tick = time.perf_counter if clock == "wall" else time.thread_time
    start, virtual, idle = time.perf_counter(), 0.0, False
    while not scheduler.done():
        c0 = tick()
        now = c0 - start if clock == "wall" else virtual
        batch = scheduler.next_batch(now)
        if batch is None:
            wait = max(0.0, scheduler.next_arrival() - now)
            if clock == "wall":
                time.sleep(wait)
            else:
                virtual += wait
            idle = True
            continue
        for rid, p in batch.prefills:
            model.allocate(rid, p + scheduler.records[rid].request.output_len)
        prefills = [(rid, prompts[rid]) for rid, _ in batch.prefills]
        decodes = [(rid, last[rid], kv) for rid, kv in batch.decodes]
        t0, cpu0 = tick(), time.thread_time()
        nxt = model.step(prefills, decodes).tolist()
        t1, cpu1 = tick(), time.thread_time()
        for (rid, _), tok in zip((*batch.prefills, *batch.decodes), nxt):
            last[rid] = tok
            scheduler.records[rid].tokens.append(tok)
        # the whole loop body (scheduling, cache allocation, step) advances the clock
        end = t1 - start if clock == "wall" else virtual + (t1 - c0)
        for rid in scheduler.complete(batch, end):
            model.free(rid)
            last.pop(rid, None)
        # cpu_s < duration_s on the wall clock: other processes held the core meanwhile
        rows.append({"start_s": now, "duration_s": t1 - t0, "cpu_s": cpu1 - cpu0,
                     "loop_s": end - now, "after_idle": idle, **batch.row()})
        virtual, idle = end, False
    return TraceResult(sorted(scheduler.records.values(), key=lambda r: r.request.rid), rows)


def _warm_up(model: KVCacheGPT, n: int) -> None:
    model.allocate(-1, 64)
    for _ in range(n):
        model.step([(-1, torch.zeros(32, dtype=torch.long))], [])
        model.step([], [(-1, 0, 40)])
    model.free(-1)


def write_result(res: TraceResult, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "iterations.jsonl", "w") as f:
        for row in res.iterations:
            f.write(json.dumps(row) + "\n")
    with open(out / "requests.jsonl", "w") as f:
        for rec in res.records:
            f.write(json.dumps({**asdict(rec.request), "ttft_s": rec.ttft_s,
                                "tpot_s": rec.tpot_s, "finish_s": rec.finish_s}) + "\n")
    summary = res.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass_args(ap, ServerConfig, "server")
    add_dataclass_args(ap, ServeModelConfig, "model", prefix="model")
    add_dataclass_args(ap, SchedulerConfig, "batching", prefix="sched")
    add_dataclass_args(ap, TraceConfig, "generated trace", prefix="trace")
    ns = ap.parse_args(argv)
    cfg = from_args(ServerConfig, ns)
    torch.set_num_threads(cfg.threads)
    try:
        requests = (load_trace(cfg.trace_file) if cfg.trace_file
                    else generate_requests(from_args(TraceConfig, ns, "trace")))
        sched = from_args(SchedulerConfig, ns, "sched")
        model = KVCacheGPT(from_args(ServeModelConfig, ns, "model"), sched.max_running + 1)
        res = serve(model, requests, sched,
                    cfg.warmup_iterations, clock=cfg.clock)
    except ValueError as e:
        print(f"serve_gpt: {e}", file=sys.stderr)
        return 2
    summary = write_result(res, cfg.out_dir)
    print(f"served {summary['requests']} requests in {summary['iterations']} iterations; "
          f"TTFT p50/p90/p99 {summary['ttft_p50_s'] * 1e3:.1f}/{summary['ttft_p90_s'] * 1e3:.1f}"
          f"/{summary['ttft_p99_s'] * 1e3:.1f} ms, TPOT p50/p90/p99 "
          f"{summary['tpot_p50_s'] * 1e3:.2f}/{summary['tpot_p90_s'] * 1e3:.2f}/"
          f"{summary['tpot_p99_s'] * 1e3:.2f} ms -> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

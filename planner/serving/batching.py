"""Continuous batching: request traces, the iteration scheduler, and per-request metrics.

One scheduler serves two interpreters, as the training Plan does: the real CPU server
(`examples/serve_gpt.py`) runs each batch it forms, the serving estimator
(`planner/serving/estimator.py`) advances a clock by the predicted iteration time. Same decisions,
so measured and predicted TTFT/TPOT differ only by iteration-time error.

Policy (Orca/vLLM style, no chunked prefill): every running request decodes one token per
iteration; waiting requests that have arrived are admitted first-come-first-served while
the iteration's token budget, the running cap and the KV-cache capacity allow. A request
reserves KV slots for prompt + output at admission (no preemption). Its prefill iteration
emits the first token; each later iteration one more.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One inference request of a trace."""

    rid: int
    """Request id (unique in the trace)."""
    arrival_s: float
    """Arrival time, seconds from the start of the trace."""
    prompt_len: int
    """Prompt tokens (prefilled in one iteration)."""
    output_len: int
    """Tokens to generate (>= 1; the first comes from the prefill iteration)."""


@dataclass(frozen=True)
class TraceConfig:
    """A synthetic request trace: Poisson arrivals, uniform prompt and output lengths."""

    rate: float = 4.0
    """Mean arrivals per second."""
    num_requests: int = 100
    """Requests in the trace."""
    prompt_len: tuple[int, int] = (16, 192)
    """Inclusive range of prompt lengths."""
    output_len: tuple[int, int] = (4, 64)
    """Inclusive range of output lengths."""
    seed: int = 0
    """Seed of the trace's own generator."""


def generate_requests(cfg: TraceConfig) -> list[Request]:
    """A deterministic trace for `cfg`."""
    if cfg.rate <= 0 or cfg.num_requests < 1:
        raise ValueError(f"trace needs rate > 0 and num_requests >= 1, got {cfg}")
    for name in ("prompt_len", "output_len"):
        lo, hi = getattr(cfg, name)
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} range {(lo, hi)} must satisfy 1 <= lo <= hi")
    rng = random.Random(cfg.seed)
    t, out = 0.0, []
    for i in range(cfg.num_requests):
        t += rng.expovariate(cfg.rate)
        out.append(Request(i, t, rng.randint(*cfg.prompt_len), rng.randint(*cfg.output_len)))
    return out


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one iteration and one replica."""

    max_batch_tokens: int = 512
    """Tokens per iteration: prefill tokens plus one per decoding request."""
    max_running: int = 32
    """Requests in flight (decoding or being prefilled) at once."""
    kv_capacity_tokens: int = 1 << 16
    """KV-cache slots of the replica; a request reserves prompt + output at admission."""


@dataclass(frozen=True)
class Batch:
    """One iteration's work: prompts to prefill and requests to decode one token for."""

    prefills: tuple[tuple[int, int], ...] = ()
    """(rid, prompt_len) of each request prefilled in this iteration."""
    decodes: tuple[tuple[int, int], ...] = ()
    """(rid, kv_len) of each decoding request: tokens attended, its new one included."""

    @property
    def prefill_tokens(self) -> int:
        return sum(p for _, p in self.prefills)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + len(self.decodes)

    @property
    def decode_kv(self) -> int:
        return sum(k for _, k in self.decodes)

    @property
    def kind(self) -> str:
        return ("mixed" if self.prefills and self.decodes
                else "prefill" if self.prefills else "decode")

    def row(self) -> dict:
        return {"kind": self.kind, "prefill_lens": [p for _, p in self.prefills],
                "decode_kv": [k for _, k in self.decodes], "tokens": self.tokens}


@dataclass
class RequestRecord:
    """What happened to one request."""

    request: Request
    admitted_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: int = 0
    tokens: list[int] = field(default_factory=list)
    """Generated token ids (the real server fills them; the simulator does not)."""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.request.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        n = self.request.output_len
        return None if n < 2 else (self.finish_s - self.first_token_s) / (n - 1)


class Scheduler:
    """Forms batches from a trace; see the module docstring for the policy."""

    def __init__(self, requests: list[Request], config: SchedulerConfig | None = None,
                 max_context: int | None = None):
        self.cfg = config or SchedulerConfig()
        for r in requests:
            need = r.prompt_len + r.output_len
            if r.output_len < 1 or r.prompt_len < 1:
                raise ValueError(f"request {r.rid}: prompt and output lengths must be >= 1")
            if r.prompt_len > self.cfg.max_batch_tokens:
                raise ValueError(f"request {r.rid}: prompt of {r.prompt_len} tokens exceeds "
                                 f"max_batch_tokens={self.cfg.max_batch_tokens}")
            if need > self.cfg.kv_capacity_tokens:
                raise ValueError(f"request {r.rid} needs {need} KV slots; the replica has "
                                 f"{self.cfg.kv_capacity_tokens}")
            if max_context is not None and need - 1 > max_context:
                raise ValueError(f"request {r.rid}: {need - 1} positions exceed the model "
                                 f"context {max_context}")
        self.pending = deque(sorted(requests, key=lambda r: (r.arrival_s, r.rid)))
        self.records = {r.rid: RequestRecord(r) for r in requests}
        self.running: dict[int, RequestRecord] = {}
        self.kv_used = 0

    def done(self) -> bool:
        return not self.pending and not self.running

    def next_arrival(self) -> float | None:
        return self.pending[0].arrival_s if self.pending else None

    def next_batch(self, now: float) -> Batch | None:
        """The batch to run at time `now`, or None when nothing is runnable yet."""
        decodes = tuple((rid, rec.request.prompt_len + rec.generated)
                        for rid, rec in self.running.items())
        budget = self.cfg.max_batch_tokens - len(decodes)
        prefills = []
        while self.pending and self.pending[0].arrival_s <= now:
            r = self.pending[0]
            need = r.prompt_len + r.output_len
            if (r.prompt_len > budget or len(self.running) >= self.cfg.max_running
                    or self.kv_used + need > self.cfg.kv_capacity_tokens):
                break  # FCFS: no overtaking
            self.pending.popleft()
            rec = self.records[r.rid]
            rec.admitted_s = now
            self.running[r.rid] = rec
            self.kv_used += need
            budget -= r.prompt_len
            prefills.append((r.rid, r.prompt_len))
        if not decodes and not prefills:
            return None
        return Batch(tuple(prefills), decodes)

    def complete(self, batch: Batch, end_s: float) -> list[int]:
        """Record the tokens `batch` produced at `end_s`; return the finished rids."""
        finished = []
        for rid, _ in (*batch.prefills, *batch.decodes):
            rec = self.running[rid]
            rec.generated += 1
            if rec.generated == 1:
                rec.first_token_s = end_s
            if rec.generated == rec.request.output_len:
                rec.finish_s = end_s
                del self.running[rid]
                self.kv_used -= rec.request.prompt_len + rec.request.output_len
                finished.append(rid)
        return finished


@dataclass
class TraceResult:
    """Per-request records and per-iteration rows of one (real or simulated) replay."""

    records: list[RequestRecord]
    iterations: list[dict] = field(default_factory=list)
    """One row per iteration: start_s, duration_s and the batch's `Batch.row()`."""

    def ttfts(self) -> list[float]:
        return [r.ttft_s for r in self.records]

    def tpots(self) -> list[float]:
        return [t for r in self.records if (t := r.tpot_s) is not None]

    def summary(self, percentiles: tuple[int, ...] = (50, 90, 99)) -> dict:
        out = {"requests": len(self.records), "iterations": len(self.iterations)}
        for name, xs in (("ttft", self.ttfts()), ("tpot", self.tpots())):
            for p in percentiles:
                out[f"{name}_p{p}_s"] = percentile(xs, p) if xs else float("nan")
        if self.records:
            end = max(r.finish_s for r in self.records)
            out["throughput_rps"] = len(self.records) / end if end > 0 else float("nan")
        return out


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), pure Python."""
    if not xs:
        raise ValueError("percentile of an empty list")
    if len(xs) == 1:
        return float(xs[0])
    q = statistics.quantiles(sorted(xs), n=1000, method="inclusive")
    k = round(p * 10)
    return float(min(xs) if k <= 0 else max(xs) if k >= 1000 else q[k - 1])

"""Serving estimator: iteration latency, KV memory and TTFT/TPOT of a replica, from a profile.

Reuses the performance-model pieces of training: a measured table
(`profiler.serving.ServingProfile`) interpolated between points, and the communication
fits (`profiler.profile.LinkFit`) for collectives. A replica is t-way tensor parallel x
p-way pipeline parallel:

- iteration = overhead + [dense(T) + sum prefill_attn(p_i) + decode_step(B, K)] / t
  + head(S) / t + 2 all-reduces of [T, d_model] fp32 per block (ring fit over t)
  + (p - 1) point-to-point sends of [T, d_model] between stages;
- pipeline stages run one batch after another (no overlap of consecutive iterations, as
  a single-engine pipelined server), so p buys memory, not speed;
- KV memory per GPU = tokens x kv_bytes_per_token / (t x p).

Only t = p = 1 runs on this machine (the CPU server); TP/PP figures are model predictions.
`simulate_trace` replays a request trace under continuous batching with the same
`planner.serving.batching.Scheduler` the real server uses, advancing a clock by the predictions
(plus the profile's measured `wake_s` on the first iteration after an idle wait).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.serving.batching import Batch, Request, Scheduler, SchedulerConfig, TraceResult
from profiler.profile import LinkFit
from profiler.serving import ServingProfile, iteration_parts
from profiler.units import GiB


class SLOError(ValueError):
    """No serving configuration meets the latency targets; the message names the best."""


class DoesNotFitError(ValueError):
    """The model's weights leave no room for a KV cache on a layout's GPUs."""


@dataclass(frozen=True)
class ServingLayout:
    """How N GPUs serve: replicas of a t-way tensor x p-way pipeline parallel model."""

    replicas: int = 1
    """Independent model copies; requests are spread over them round-robin."""
    tp: int = 1
    """Tensor-parallel degree inside a replica (heads and MLP columns split)."""
    pp: int = 1
    """Pipeline-parallel degree inside a replica (blocks split into stages)."""

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.replicas * self.gpus_per_replica

    def __str__(self) -> str:
        return f"{self.replicas} x (tp{self.tp} pp{self.pp})"


@dataclass(frozen=True)
class ServingCostConfig:
    """Machine facts the serving estimate needs beyond the profile."""

    memory_bytes_per_gpu: float = 16 * GiB
    """Device memory of one GPU."""
    reserve_bytes: float = 0.0
    """Per-GPU memory kept free (framework, activations of one iteration)."""
    link: LinkFit = field(default_factory=lambda: LinkFit(10e-6, 100e9, [], "assumed"))
    """Collective/p2p fit between GPUs of a replica (default: NVLink-class, assumed)."""
    max_kv_tokens: int | None = None
    """Cap on KV slots per replica (e.g. what the real server preallocates); None: memory."""


class ServingCostModel:
    """Predicts one replica's iteration time and memory; see the module docstring."""

    def __init__(self, profile: ServingProfile, tp: int = 1, pp: int = 1,
                 config: ServingCostConfig | None = None):
        m = profile.model
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
        if m["n_heads"] % tp:
            raise ValueError(f"tp={tp} does not divide n_heads={m['n_heads']}")
        if pp > m["n_blocks"]:
            raise ValueError(f"pp={pp} exceeds n_blocks={m['n_blocks']}")
        self.profile, self.tp, self.pp = profile, tp, pp
        self.cfg = config or ServingCostConfig()

    # ---- time -------------------------------------------------------------------------
    def iteration_s(self, batch: Batch) -> float:
        """Predicted latency of one iteration of `batch`."""
        return self.iteration_from_shape([p for _, p in batch.prefills],
                                         [k for _, k in batch.decodes])

    def iteration_from_shape(self, prefill_lens: list[int], decode_kv: list[int]) -> float:
        prof, t = self.profile, self.tp
        n = len(prefill_lens) + len(decode_kv)
        if n == 0:
            return 0.0
        tokens = sum(prefill_lens) + len(decode_kv)
        one_gpu = iteration_parts(prof, prefill_lens, decode_kv)
        if prefill_lens:
            one_gpu += (0.0 if decode_kv else prof.overhead_s)
            one_gpu += prof.overhead_per_request_s * len(prefill_lens)
        # host-side overhead does not shrink with t; the rest (all compute) splits t ways
        host = min(one_gpu, prof.overhead_s + prof.overhead_per_request_s * n)
        act_bytes = tokens * prof.model["d_model"] * 4.0
        comm = (2 * prof.model["n_blocks"] * self.cfg.link.ring_allreduce_s(act_bytes, t)
                + (self.pp - 1) * self.cfg.link.p2p_s(act_bytes))
        return host + (one_gpu - host) / t + comm

    # ---- memory -----------------------------------------------------------------------
    def kv_bytes_per_token_per_gpu(self) -> float:
        return self.profile.kv_bytes_per_token / (self.tp * self.pp)

    def kv_memory_bytes(self, tokens: int) -> float:
        """KV-cache bytes `tokens` slots take on each GPU of the replica."""
        return tokens * self.kv_bytes_per_token_per_gpu()

    def kv_capacity_tokens(self) -> int:
        """KV slots a replica can hold: free memory of its fullest GPU / bytes per slot."""
        params = self.profile.param_bytes / (self.tp * self.pp)
        free = self.cfg.memory_bytes_per_gpu - self.cfg.reserve_bytes - params
        if free <= 0:
            raise DoesNotFitError(f"the model does not fit: {params / GiB:.2f} GiB of parameters "
                             f"per GPU at tp={self.tp} pp={self.pp} with "
                             f"{self.cfg.memory_bytes_per_gpu / GiB:.2f} GiB per GPU")
        cap = int(free // self.kv_bytes_per_token_per_gpu())
        return min(cap, self.cfg.max_kv_tokens) if self.cfg.max_kv_tokens else cap

    def scheduler_config(self, base: SchedulerConfig) -> SchedulerConfig:
        """`base` with its KV capacity bounded by this replica's memory."""
        return SchedulerConfig(base.max_batch_tokens, base.max_running,
                               min(base.kv_capacity_tokens, self.kv_capacity_tokens()))


def simulate_trace(requests: list[Request], cost: ServingCostModel,
                   sched: SchedulerConfig | None = None,
                   idle_wake: bool = True) -> TraceResult:
    """Replay `requests` on one replica under continuous batching with predicted times.

    `idle_wake`: the first iteration after an idle wait costs the profile's `wake_s` more
    (a real server sleeps between arrivals and comes back to cold caches); False for a
    server that never sleeps (`examples/serve_gpt.py --clock cpu`)."""
    scheduler = Scheduler(requests, cost.scheduler_config(sched or SchedulerConfig()),
                          max_context=cost.profile.model["context"])
    now, rows, idle = 0.0, [], False
    wake = cost.profile.wake_s if idle_wake else 0.0
    while not scheduler.done():
        batch = scheduler.next_batch(now)
        if batch is None:
            now = max(now, scheduler.next_arrival())
            idle = True
            continue
        dt = cost.iteration_s(batch) + (wake if idle else 0.0)
        rows.append({"start_s": now, "duration_s": dt, "after_idle": idle, **batch.row()})
        now += dt
        idle = False
        scheduler.complete(batch, now)
    return TraceResult(list(scheduler.records.values()), rows)


def split_round_robin(requests: list[Request], replicas: int) -> list[list[Request]]:
    """Requests spread over replicas in arrival order (what the router does)."""
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    return [ordered[i::replicas] for i in range(replicas)]


def simulate_layout(requests: list[Request], profile: ServingProfile, layout: ServingLayout,
                    config: ServingCostConfig | None = None,
                    sched: SchedulerConfig | None = None,
                    idle_wake: bool = True) -> TraceResult:
    """Replay a trace on every replica of `layout`; records of all replicas together."""
    cost = ServingCostModel(profile, layout.tp, layout.pp, config)
    records, rows = [], []
    for i, part in enumerate(split_round_robin(requests, layout.replicas)):
        if not part:
            continue
        res = simulate_trace(part, cost, sched, idle_wake)
        records += res.records
        rows += [{**r, "replica": i} for r in res.iterations]
    return TraceResult(sorted(records, key=lambda r: r.request.rid), rows)

"""Profiles that need no measuring: the emulated model, and GPT-3-like layers by formula.

`emulated_profile` reads the durations the emulated model is configured to sleep, so the
simulator and the emulated engine share their ground truth. `formula_profile` builds a
GPT-3-style layer table from FLOP and byte counts with an assumed device speed, so plans
for 1024 ranks can be searched on a laptop.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field

from profiler.profile import CommProfile, LayerProfile, LinkFit, Profile

GPT3_PRESETS: dict[str, tuple[int, int, int]] = {
    # name: (blocks, d_model, heads) from Brown et al. 2020, table 2.1
    "gpt3-125m": (12, 768, 12),
    "gpt3-350m": (24, 1024, 16),
    "gpt3-760m": (24, 1536, 16),
    "gpt3-1.3b": (24, 2048, 24),
    "gpt3-2.7b": (32, 2560, 32),
    "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5140, 40),
    "gpt3-175b": (96, 12288, 96),
}


def loopback_comm(alpha_s: float = 100e-6, beta_Bps: float = 1e9,
                  commit_s: float = 1e-3) -> CommProfile:
    """Assumed gloo-over-loopback fits (used when no comm benchmark was run)."""
    fit = LinkFit(alpha_s, beta_Bps, [], "assumed")
    return CommProfile(p2p={"intra": fit}, allreduce={"intra": LinkFit(**asdict(fit))},
                       commit_s=commit_s)


def emulated_profile(
    cfg: object,
    microbatch_sizes: tuple[int, ...] = (1, 64),
    comm: CommProfile | None = None,
) -> Profile:
    """Profile of `odyssey.emulate.build_emulated(cfg)` from its configured durations.

    `cfg` is duck-typed: `.num_layers`, `.forward_ms`, `.backward_ms` (one value or one
    per layer) and `.dim`. Emulated layers sleep the same time whatever the microbatch
    size, so the time columns are constant; bytes follow the tiny real tensors carried.
    Each layer saves its [mb, dim] fp32 input (linear map) and its output (tanh), but in
    a chain the output *is* the next layer's saved input, or the stage's output buffer
    (the cost model adds one per stage), so each layer is charged its input only;
    the last layer, whose output feeds the loss instead, is charged its input, its
    output and the loss's saved difference (as `profile_model` profiles the last layer
    with its loss). Stage sums then equal the unique storages the engine holds
    (checked by benchmarks/model_accuracy.py); charging 2 x [mb, dim] per layer counted
    every inner boundary twice.
    """
    n = int(cfg.num_layers)
    fwd = _per_layer(cfg.forward_ms, n)
    bwd = _per_layer(cfg.backward_ms, n)
    dim = int(cfg.dim)
    mbs = sorted(set(int(m) for m in microbatch_sizes))
    act = [float(mb * dim * 4) for mb in mbs]
    layers = [
        LayerProfile(
            index=i, name="EmulatedLayer", param_count=dim * dim + dim,
            param_bytes=4 * (dim * dim + dim),
            forward_s=[fwd[i] / 1e3] * len(mbs), backward_s=[bwd[i] / 1e3] * len(mbs),
            activation_bytes=[(3 if i == n - 1 else 1) * a for a in act],
            output_bytes=list(act),
        )
        for i in range(n)
    ]
    return Profile(
        kind="emulated",
        device={"name": "emulated (sleep)", "host": socket.gethostname()},
        config={"num_layers": n, "forward_ms": fwd, "backward_ms": bwd, "dim": dim},
        model=f"emulated-{n}", microbatch_sizes=mbs, layers=layers,
        comm=comm or loopback_comm(),
    ).check()


def _per_layer(value: object, n: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]  # type: ignore[attr-defined]
    if len(vals) != n:
        raise ValueError(f"{len(vals)} per-layer times given for {n} layers")
    return vals


@dataclass(frozen=True)
class FormulaConfig:
    """A GPT-3-like model and the device assumed to run it."""

    preset: str = "gpt3-13b"
    """One of GPT3_PRESETS (sets blocks, d_model, heads) unless those are given."""
    n_blocks: int | None = None
    """Transformer blocks (overrides the preset)."""
    d_model: int | None = None
    """Hidden width (overrides the preset)."""
    n_heads: int | None = None
    """Attention heads (overrides the preset)."""
    seq_len: int = 2048
    """Context length."""
    vocab_size: int = 50257
    """Vocabulary size."""
    microbatch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Microbatch sizes tabulated (values are exact at these, interpolated elsewhere)."""
    device_tflops: float = 312.0
    """Peak dense bf16 TFLOP/s of the device (A100: 312)."""
    mfu: float = 0.5
    """Fraction of peak that the layers achieve."""
    hbm_GBps: float = 2000.0
    """Device memory bandwidth, GB/s (memory-bound layers and the optimizer)."""
    intra_alpha_us: float = 5.0
    """Intra-node link latency, microseconds."""
    intra_GBps: float = 150.0
    """Intra-node link bandwidth, GB/s (NVLink-class)."""
    inter_alpha_us: float = 10.0
    """Inter-node link latency, microseconds."""
    inter_GBps: float = 25.0
    """Inter-node link bandwidth, GB/s (200 Gb/s NIC)."""
    commit_ms: float = 1.0
    """Commit round trip, milliseconds."""
    bytes_per_param: tuple[int, int, int] = (2, 4, 12)
    """(parameter, gradient, optimizer state) bytes per parameter: bf16 weights, fp32
    gradients, fp32 master copy + two AdamW moments."""
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into the profile's config."""

    def sizes(self) -> tuple[int, int, int]:
        if self.preset not in GPT3_PRESETS and None in (self.n_blocks, self.d_model,
                                                          self.n_heads):
            raise ValueError(f"unknown preset {self.preset!r}; choose one of "
                             f"{sorted(GPT3_PRESETS)} or give n_blocks, d_model, n_heads")
        b, d, h = GPT3_PRESETS.get(self.preset, (0, 0, 0))
        return self.n_blocks or b, self.d_model or d, self.n_heads or h


def formula_profile(cfg: FormulaConfig | None = None) -> Profile:
    """GPT-3-like layer table (embedding, blocks, head) from FLOP and byte formulas.

    Block: 24*T*d^2 + 4*T*s*d forward FLOPs for T = mb*s tokens, backward twice that;
    activations s*b*d*(34 + 5*a*s/d) bytes (Korthikanti et al. 2022, no recompute).
    """
    cfg = cfg or FormulaConfig()
    nb, d, heads = cfg.sizes()
    s, v = cfg.seq_len, cfg.vocab_size
    pb, gb, ob = cfg.bytes_per_param
    flops = cfg.device_tflops * 1e12 * cfg.mfu
    hbm = cfg.hbm_GBps * 1e9
    mbs = sorted(set(cfg.microbatch_sizes))

    def layer(i: int, name: str, params: int, fwd_flops, fwd_bytes, act, out) -> LayerProfile:
        fwd = [max(fwd_flops(mb) / flops, fwd_bytes(mb) / hbm) for mb in mbs]
        return LayerProfile(
            index=i, name=name, param_count=params, param_bytes=params * pb,
            forward_s=fwd, backward_s=[2 * f for f in fwd],
            activation_bytes=[float(act(mb)) for mb in mbs],
            output_bytes=[float(out(mb)) for mb in mbs],
            optimizer_s=params * (pb + gb + 2 * ob) / hbm,
        )

    block_params = 12 * d * d + 13 * d
    layers = [layer(0, "Embedding", v * d + s * d, lambda mb: 0.0,
                    lambda mb: 3 * mb * s * d * pb, lambda mb: mb * s * 8,
                    lambda mb: mb * s * d * pb)]
    for i in range(1, nb + 1):
        layers.append(layer(
            i, "Block", block_params,
            lambda mb: 24 * mb * s * d * d + 4 * mb * s * s * d,
            lambda mb: 2 * block_params * pb,
            lambda mb: s * mb * d * (34 + 5 * heads * s / d),
            lambda mb: mb * s * d * pb))
    layers.append(layer(nb + 1, "Head", v * d + 2 * d,
                        lambda mb: 2 * mb * s * d * v + 5 * mb * s * v,
                        lambda mb: v * d * pb, lambda mb: mb * s * (d * pb + v * 4),
                        lambda mb: mb * s * v * pb))

    def fit(alpha_us: float, gbps: float) -> LinkFit:
        return LinkFit(alpha_us * 1e-6, gbps * 1e9, [], "formula")

    comm = CommProfile(
        p2p={"intra": fit(cfg.intra_alpha_us, cfg.intra_GBps),
             "inter": fit(cfg.inter_alpha_us, cfg.inter_GBps)},
        allreduce={"intra": fit(cfg.intra_alpha_us, cfg.intra_GBps),
                   "inter": fit(cfg.inter_alpha_us, cfg.inter_GBps)},
        commit_s=cfg.commit_ms / 1e3,
    )
    conf = {k: (list(x) if isinstance(x, tuple) else x) for k, x in asdict(cfg).items()}
    conf.update(n_blocks=nb, d_model=d, n_heads=heads)
    return Profile(
        kind="formula",
        device={"name": "assumed", "tflops": cfg.device_tflops, "mfu": cfg.mfu,
                "hbm_GBps": cfg.hbm_GBps},
        config=conf, model=f"{cfg.preset}-like-{nb}x{d}", microbatch_sizes=mbs,
        layers=layers, comm=comm, grad_bytes_per_param=float(gb),
        optimizer_bytes_per_param=float(ob),
    ).check()

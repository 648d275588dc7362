"""`odyssey profile`: measure (or derive) a model's profile and write it as JSON.

    odyssey profile --model gpt --n-blocks 4 --d-model 64 --microbatch-sizes 1,2,4 \
        --out profile.json
    odyssey profile --model emulated --num-layers 8 --forward-ms 5 --backward-ms 10
    odyssey profile --model formula --preset gpt3-13b --tflops 312 --mfu 0.5

The GPT example is loaded by module path (`examples.gpt`) at run time, so the profiler
itself never imports the engine.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass

import torch

from profiler.comm import CommBenchConfig, bench_comm
from profiler.configtree import ConfigParser, section
from profiler.layers import LayerProfilerConfig, profile_model
from profiler.profile import LinkFit, Profile
from profiler.synthetic import FormulaConfig, emulated_profile, formula_profile
from profiler.timing import TimingConfig

MODELS = ("gpt", "emulated", "formula")


@dataclass(frozen=True)
class GPTShape:
    """The example GPT, measured (its shape fields also override a formula preset)."""

    vocab_size: int = 64
    """Token vocabulary of the measured GPT."""
    seq_len: int | None = None
    """Context length (gpt default 32, formula default 2048)."""
    d_model: int | None = None
    """Hidden width (default: the GPT's, or the formula preset's)."""
    n_heads: int | None = None
    """Attention heads (default: the GPT's, or the formula preset's)."""
    n_blocks: int | None = None
    """Transformer blocks (default: the GPT's, or the formula preset's)."""
    device: str = "cpu"
    """Device the layers are measured on."""
    threads: int | None = None
    """Torch threads while measuring (1 on a shared CPU)."""


@dataclass(frozen=True)
class EmulatedLayers:
    """Sleeping layers with configured times (nothing is measured)."""

    num_layers: int = 8
    """Layers in the emulated model."""
    forward_ms: float | tuple[float, ...] = 5.0
    """Forward time per layer per microbatch, ms (one value, or one per layer)."""
    backward_ms: float | tuple[float, ...] = 10.0
    """Backward time per layer per microbatch, ms (one value, or one per layer)."""
    dim: int = 16
    """Width of the tiny tensors carried between layers."""


@dataclass(frozen=True)
class FormulaDevice:
    """A GPT-3-like layer table from formulas (no measuring) and the device it assumes."""

    preset: str = "gpt3-13b"
    """GPT-3-like preset (sets blocks, d_model, heads unless given)."""
    tflops: float = 312.0
    """Device peak TFLOP/s."""
    mfu: float = 0.5
    """Achieved fraction of peak."""
    hbm_gbps: float = 2000.0
    """Device memory bandwidth, GB/s."""


@dataclass(frozen=True)
class CommOptions:
    """Communication fits."""

    comm: str = ""
    """measure (run the gloo micro-benchmarks) or assume (loopback/formula figures);
    empty: measure for gpt, assume otherwise."""
    comm_group_sizes: tuple[int, ...] = (2, 4)
    """All-reduce group sizes measured."""
    comm_bytes: tuple[int, ...] = (1 << 10, 1 << 14, 1 << 17, 1 << 20)
    """Message sizes measured, bytes."""
    inter_alpha_us: float | None = None
    """Declare the inter-node link latency, us (not measurable here; with --inter-gbps)."""
    inter_gbps: float | None = None
    """Declare the inter-node link bandwidth, GB/s (with --inter-alpha-us)."""

    def __post_init__(self) -> None:
        if self.comm not in ("", "measure", "assume"):
            raise ValueError(f"--comm must be measure or assume, got {self.comm!r}")
        if (self.inter_alpha_us is None) != (self.inter_gbps is None):
            raise ValueError("give both --inter-alpha-us and --inter-gbps")


@dataclass(frozen=True)
class ProfileCommand:
    """What `odyssey profile` measures or derives, and where it writes the profile."""

    model: str = "gpt"
    """What to profile: gpt (the example GPT, measured), emulated or formula."""
    out: str = "profile.json"
    """Output JSON path."""
    microbatch_sizes: tuple[int, ...] = (1, 2, 4)
    """Microbatch sizes tabulated."""
    gpt: GPTShape = section(GPTShape, flat=True)
    timing: TimingConfig = section(TimingConfig, flat=True)
    emulated: EmulatedLayers = section(EmulatedLayers, flat=True)
    formula: FormulaDevice = section(FormulaDevice, flat=True)
    comm: CommOptions = section(CommOptions, flat=True)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {MODELS}, got {self.model!r}")


def build_parser() -> ConfigParser:
    return ConfigParser(ProfileCommand, prog="odyssey profile",
                        description=__doc__.split("\n")[0])


def profile_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey profile`; returns the exit status."""
    cmd = build_parser().parse_config(argv)
    t0 = time.perf_counter()
    try:
        prof = _build(cmd)
    except (ValueError, RuntimeError) as e:
        print(f"odyssey profile: {e}", file=sys.stderr)
        return 2
    c = cmd.comm
    if c.inter_alpha_us is not None:
        fit = LinkFit(c.inter_alpha_us * 1e-6, c.inter_gbps * 1e9, [], "assumed")
        prof.comm.p2p["inter"] = fit
        prof.comm.allreduce["inter"] = LinkFit(fit.alpha_s, fit.beta_Bps, [], "assumed")
    prof.check()
    prof.save(cmd.out)
    print(summary(prof))
    print(f"wrote {cmd.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _build(cmd: ProfileCommand) -> Profile:
    comm_mode = cmd.comm.comm or ("measure" if cmd.model == "gpt" else "assume")
    comm = None
    if comm_mode == "measure":
        comm = bench_comm(CommBenchConfig(group_sizes=cmd.comm.comm_group_sizes,
                                          message_bytes=cmd.comm.comm_bytes))
    if cmd.model == "emulated":
        return emulated_profile(cmd.emulated, comm=comm)
    if cmd.model == "formula":
        g, f = cmd.gpt, cmd.formula
        fcfg = FormulaConfig(preset=f.preset, n_blocks=g.n_blocks, d_model=g.d_model,
                             n_heads=g.n_heads, seq_len=g.seq_len or 2048,
                             microbatch_sizes=cmd.microbatch_sizes, device_tflops=f.tflops,
                             mfu=f.mfu, hbm_GBps=f.hbm_gbps)
        prof = formula_profile(fcfg)
        if comm is not None:
            prof.comm = comm
        return prof
    return _measure_gpt(cmd, comm)


def _measure_gpt(cmd: ProfileCommand, comm) -> Profile:
    gpt = importlib.import_module("examples.gpt")
    g = cmd.gpt
    kw = {k: v for k, v in (("vocab_size", g.vocab_size), ("seq_len", g.seq_len),
                            ("d_model", g.d_model), ("n_heads", g.n_heads),
                            ("n_blocks", g.n_blocks)) if v is not None}
    cfg = gpt.GPTConfig(**kw)
    model = gpt.build_gpt(cfg)
    gen = torch.Generator().manual_seed(0)

    def tokens(mb: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (mb, cfg.seq_len), generator=gen)

    lcfg = LayerProfilerConfig(microbatch_sizes=cmd.microbatch_sizes, timing=cmd.timing,
                               device=g.device, num_threads=g.threads)
    return profile_model(model, lcfg, input_fn=tokens, target_fn=tokens, comm=comm,
                         run_config={"model": "gpt", **kw})


def summary(prof: Profile) -> str:
    """Per-layer table of a profile at its first microbatch size, and the comm fits."""
    mb = prof.microbatch_sizes[0]
    lines = [f"profile {prof.model} ({prof.kind}) on {prof.device.get('name', '?')}; "
             f"microbatch sizes {prof.microbatch_sizes}; values at mb={mb}",
             f"{'layer':>5} {'name':<14} {'fwd ms':>9} {'bwd ms':>9} {'act KiB':>10} "
             f"{'params MiB':>10}"]
    for i, lp in enumerate(prof.layers):
        lines.append(f"{i:>5} {lp.name[:14]:<14} {prof.forward_s(i, mb) * 1e3:>9.3f} "
                     f"{prof.backward_s(i, mb) * 1e3:>9.3f} "
                     f"{prof.activation_bytes(i, mb) / 1024:>10.1f} "
                     f"{lp.param_bytes / 2**20:>10.2f}")
    for table in ("p2p", "allreduce"):
        for link, fit in getattr(prof.comm, table).items():
            lines.append(f"{table} {link}: alpha {fit.alpha_s * 1e6:.1f} us, beta "
                         f"{fit.beta_Bps / 1e9:.3f} GB/s ({fit.source}, {len(fit.points)} points)")
    lines.append(f"commit {prof.comm.commit_s * 1e3:.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(profile_main())

"""`odyssey profile`: measure (or derive) a model's profile and write it as JSON.

    odyssey profile --model gpt --n-blocks 4 --d-model 64 --microbatch-sizes 1,2,4 \
        --out profile.json
    odyssey profile --model emulated --num-layers 8 --forward-ms 5 --backward-ms 10
    odyssey profile --model formula --preset gpt3-13b --tflops 312 --mfu 0.5

The GPT example is loaded by module path (`examples.gpt`) at run time, so the profiler
itself never imports the engine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import SimpleNamespace

from profiler.profile import LinkFit, Profile


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> float | tuple[float, ...]:
    vals = tuple(float(x) for x in text.split(",") if x.strip())
    return vals[0] if len(vals) == 1 else vals


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="odyssey profile", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("gpt", "emulated", "formula"), default="gpt",
                    help="what to profile (default: the example GPT, measured)")
    ap.add_argument("--out", default="profile.json", help="output JSON path")
    ap.add_argument("--microbatch-sizes", type=_ints, default=(1, 2, 4),
                    help="comma-separated microbatch sizes (default 1,2,4)")
    g = ap.add_argument_group("gpt (measured)")
    g.add_argument("--vocab-size", type=int, default=64)
    g.add_argument("--seq-len", type=int, default=None,
                   help="context length (gpt default 32, formula default 2048)")
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--n-heads", type=int, default=None)
    g.add_argument("--n-blocks", type=int, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads while measuring (1 on a shared CPU)")
    e = ap.add_argument_group("emulated")
    e.add_argument("--num-layers", type=int, default=8)
    e.add_argument("--forward-ms", type=_floats, default=5.0, help="one value or per layer")
    e.add_argument("--backward-ms", type=_floats, default=10.0, help="one value or per layer")
    e.add_argument("--dim", type=int, default=16)
    f = ap.add_argument_group("formula (GPT-3-like, no measuring)")
    f.add_argument("--preset", default="gpt3-13b")
    f.add_argument("--tflops", type=float, default=312.0, help="device peak TFLOP/s")
    f.add_argument("--mfu", type=float, default=0.5, help="achieved fraction of peak")
    f.add_argument("--hbm-gbps", type=float, default=2000.0)
    c = ap.add_argument_group("communication")
    c.add_argument("--comm", choices=("measure", "assume"), default=None,
                   help="run the gloo micro-benchmarks (default for gpt) or assume "
                        "loopback/formula figures (default otherwise)")
    c.add_argument("--comm-group-sizes", type=_ints, default=(2, 4))
    c.add_argument("--comm-bytes", type=_ints, default=(1 << 10, 1 << 14, 1 << 17, 1 << 20))
    c.add_argument("--inter-alpha-us", type=float, default=None,
                   help="declare the inter-node link latency (not measurable here)")
    c.add_argument("--inter-gbps", type=float, default=None,
                   help="declare the inter-node link bandwidth, GB/s")
    return ap


def profile_main(argv: list[str] | None = None) -> int:
    """Entry point of `odyssey profile`; returns the exit status."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        prof = _build(args)
    except (ValueError, RuntimeError) as e:
        print(f"odyssey profile: {e}", file=sys.stderr)
        return 2
    if (args.inter_alpha_us is None) != (args.inter_gbps is None):
        print("odyssey profile: give both --inter-alpha-us and --inter-gbps", file=sys.stderr)
        return 2
    if args.inter_alpha_us is not None:
        fit = LinkFit(args.inter_alpha_us * 1e-6, args.inter_gbps * 1e9, [], "assumed")
        prof.comm.p2p["inter"] = fit
        prof.comm.allreduce["inter"] = LinkFit(fit.alpha_s, fit.beta_Bps, [], "assumed")
    prof.check()
    prof.save(args.out)
    print(summary(prof))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _build(args) -> Profile:
    from profiler.synthetic import FormulaConfig, emulated_profile, formula_profile

    comm_mode = args.comm or ("measure" if args.model == "gpt" else "assume")
    comm = None
    if comm_mode == "measure":
        from profiler.comm import CommBenchConfig, bench_comm

        comm = bench_comm(CommBenchConfig(group_sizes=args.comm_group_sizes,
                                          message_bytes=args.comm_bytes))
    if args.model == "emulated":
        cfg = SimpleNamespace(num_layers=args.num_layers, forward_ms=args.forward_ms,
                              backward_ms=args.backward_ms, dim=args.dim)
        return emulated_profile(cfg, comm=comm)
    if args.model == "formula":
        fcfg = FormulaConfig(preset=args.preset, n_blocks=args.n_blocks, d_model=args.d_model,
                             n_heads=args.n_heads, seq_len=args.seq_len or 2048,
                             microbatch_sizes=args.microbatch_sizes, device_tflops=args.tflops,
                             mfu=args.mfu, hbm_GBps=args.hbm_gbps)
        prof = formula_profile(fcfg)
        if comm is not None:
            prof.comm = comm
        return prof
    return _measure_gpt(args, comm)


def _measure_gpt(args, comm) -> Profile:
    import torch

    from profiler.layers import LayerProfilerConfig, profile_model
    from profiler.timing import TimingConfig

    gpt = importlib.import_module("examples.gpt")
    kw = {k: v for k, v in (("vocab_size", args.vocab_size), ("seq_len", args.seq_len),
                            ("d_model", args.d_model), ("n_heads", args.n_heads),
                            ("n_blocks", args.n_blocks)) if v is not None}
    cfg = gpt.GPTConfig(**kw)
    model = gpt.build_gpt(cfg)
    gen = torch.Generator().manual_seed(0)

    def tokens(mb: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (mb, cfg.seq_len), generator=gen)

    lcfg = LayerProfilerConfig(microbatch_sizes=args.microbatch_sizes,
                               timing=TimingConfig(args.warmup, args.repeats),
                               device=args.device, num_threads=args.threads)
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

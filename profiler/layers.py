"""Layer profiler: time forward and backward separately, count bytes, per microbatch size.

The model is duck-typed (a `LayeredModel`): `.num_layers`, `.build_layer(i)`,
`.activation_spec(mb)` with `.shape`/`.dtype`, `.loss_fn`. Layer 0's input comes from
`input_fn(mb)` (e.g. int64 tokens); every other layer gets a random activation of the
spec's shape that requires grad, as a pipeline stage does. The last layer's backward
starts from `loss_fn(out, target_fn(mb)).mean()` when `target_fn` is given, else from a
random output gradient.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from profiler.profile import CommProfile, LayerProfile, Profile
from profiler.synthetic import loopback_comm
from profiler.timing import TimingConfig, robust_stat


@dataclass(frozen=True)
class LayerProfilerConfig:
    """How the layer profiler measures."""

    microbatch_sizes: tuple[int, ...] = (1, 2, 4)
    """Microbatch sizes to measure (the cost model interpolates between them)."""
    timing: TimingConfig = field(default_factory=TimingConfig)
    """Warm-up, repeats and outlier trimming for each timed quantity."""
    device: str = "cpu"
    """Torch device to run the layers on ('cpu', 'cuda', 'cuda:1', ...)."""
    optimizer_repeats: int = 3
    """Timed AdamW steps per layer (median kept); 0 skips it (optimizer_s = 0). The
    first AdamW of a process pays a one-off import of several seconds."""
    seed: int = 0
    """Seed for the random inputs."""
    global_warmup: bool = True
    """Run every layer once, untimed, before measuring any."""
    num_threads: int | None = None
    """torch intra-op threads while measuring (None: leave as is). Use 1 on a shared or
    oversubscribed CPU, where spinning OpenMP threads distort timings badly."""


def device_description(device: str) -> dict:
    """Name, host and library versions of the device that ran the measurements."""
    desc = {"device": device, "host": socket.gethostname(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        desc["name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        desc["name"] = platform.processor() or platform.machine() or "cpu"
    return desc


def profile_model(
    model: object,
    config: LayerProfilerConfig | None = None,
    input_fn: Callable[[int], torch.Tensor] | None = None,
    target_fn: Callable[[int], torch.Tensor] | None = None,
    comm: CommProfile | None = None,
    run_config: dict | None = None,
) -> Profile:
    """Measure every layer of `model` and return a `Profile` ('measured')."""
    cfg = config or LayerProfilerConfig()
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _profile_model(model, cfg, input_fn, target_fn, comm, run_config)
    finally:
        torch.set_num_threads(threads)


def _profile_model(model, cfg: LayerProfilerConfig, input_fn, target_fn, comm,
                   run_config) -> Profile:
    mbs = sorted(set(cfg.microbatch_sizes))
    if cfg.global_warmup:  # first-use costs (kernel selection, allocator) hit layer 1 else
        quick = LayerProfilerConfig(mbs[-1:], TimingConfig(1, 1), cfg.device, 1, cfg.seed,
                                    False)
        for i in range(int(model.num_layers)):
            profile_layer(model, i, mbs[-1:], quick, input_fn, target_fn)
    layers = [
        profile_layer(model, i, mbs, cfg, input_fn, target_fn)
        for i in range(int(model.num_layers))
    ]
    conf = {"microbatch_sizes": mbs, "warmup": cfg.timing.warmup,
            "repeats": cfg.timing.repeats, "device": cfg.device,
            "threads": torch.get_num_threads()}
    conf.update(run_config or {})
    return Profile(
        kind="measured", device=device_description(cfg.device), config=conf,
        model=str(getattr(model, "name", type(model).__name__)), microbatch_sizes=mbs,
        layers=layers, comm=comm or loopback_comm(),
        grad_bytes_per_param=_grad_bytes(layers), optimizer_bytes_per_param=8.0,
    ).check(int(model.num_layers))


def _grad_bytes(layers: list[LayerProfile]) -> float:
    count = sum(lp.param_count for lp in layers)
    return sum(lp.param_bytes for lp in layers) / count if count else 4.0


def profile_layer(
    model: object,
    index: int,
    microbatch_sizes: Sequence[int],
    config: LayerProfilerConfig | None = None,
    input_fn: Callable[[int], torch.Tensor] | None = None,
    target_fn: Callable[[int], torch.Tensor] | None = None,
) -> LayerProfile:
    """Measure one layer at each microbatch size."""
    cfg = config or LayerProfilerConfig()
    dev = torch.device(cfg.device)
    layer = model.build_layer(index).to(dev)
    params = list({id(p): p for p in layer.parameters()}.values())
    last = index == int(model.num_layers) - 1
    gen = torch.Generator().manual_seed(cfg.seed + index)
    fwd, bwd, act, out = [], [], [], []
    for mb in microbatch_sizes:
        x = _layer_input(model, index, mb, input_fn, gen).to(dev)
        target = target_fn(mb).to(dev) if (last and target_fn) else None
        f, b, a, o = _measure(layer, x, model.loss_fn if target is not None else None,
                              target, params, cfg.timing, dev, gen)
        fwd.append(f)
        bwd.append(b)
        act.append(float(a))
        out.append(float(o))
    return LayerProfile(
        index=index, name=type(layer).__name__,
        param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        forward_s=fwd, backward_s=bwd, activation_bytes=act, output_bytes=out,
        optimizer_s=_time_optimizer(params, cfg.optimizer_repeats, dev),
    )


def _layer_input(model, index, mb, input_fn, gen) -> torch.Tensor:
    if index == 0:
        if input_fn is None:
            raise ValueError("layer 0 needs input_fn(mb) -> tensor (e.g. int64 tokens)")
        return input_fn(mb)
    spec = model.activation_spec(mb)
    x = torch.randn(tuple(spec.shape), generator=gen).to(spec.dtype)
    return x.requires_grad_(x.is_floating_point())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measure(layer, x, loss_fn, target, params, timing: TimingConfig, dev, gen):
    """(forward_s, backward_s, saved activation bytes, output bytes) of one layer."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    fwd_samples, bwd_samples = [], []
    saved_bytes = out_bytes = 0
    grad_out = None
    for rep in range(timing.warmup + max(1, timing.repeats)):
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages=storages) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in param_ptrs:
                storages[st.data_ptr()] = st.nbytes()
            return t

        _sync(dev)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
            root = loss_fn(y, target).mean() if loss_fn is not None else y
        _sync(dev)
        t1 = time.perf_counter()
        if loss_fn is None and grad_out is None:
            grad_out = torch.randn(y.shape, generator=gen).to(device=dev, dtype=y.dtype)
        if root.requires_grad:
            root.backward(None if loss_fn is not None else grad_out)
        _sync(dev)
        t2 = time.perf_counter()
        if rep >= timing.warmup:
            fwd_samples.append(t1 - t0)
            bwd_samples.append(t2 - t1)
        saved_bytes = sum(storages.values())
        out_bytes = y.numel() * y.element_size()
        del y, root
    return (robust_stat(fwd_samples, timing.outlier_mads).median,
            robust_stat(bwd_samples, timing.outlier_mads).median, saved_bytes, out_bytes)


def _time_optimizer(params: list[torch.nn.Parameter], repeats: int, dev) -> float:
    if not params or repeats <= 0:
        return 0.0
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [p.detach().clone() for p in params]
    samples = []
    for _ in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        opt.step()
        _sync(dev)
        samples.append(time.perf_counter() - t0)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return robust_stat(samples[1:]).median

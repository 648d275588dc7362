"""DeepSpeed side of `engine_vs_deepspeed.py`: train the example GPT with `PipelineEngine`.

Started by torchrun (one process per rank), never by hand:

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port P \
        benchmarks/_ds_worker.py --dp 2 --pp 2 --num-microbatches 8 --microbatch-size 4 \
        --steps 24 --out build/x.json --gpt-d-model 256 --gpt-n-blocks 6 --gpt-seq-len 64

Same model (layers from `build_gpt(cfg).build_layer(i)`, so the same initial weights), same
data (pipeline d trains microbatches d, d+D, d+2D, ... of each step, exactly as Odyssey's
`Plan.uniform` deals them), same optimizer maths (torch AdamW, lr 3e-3, betas (0.9, 0.95),
wd 0), fp32, ZeRO stage 0, gloo. Rank 0 writes a JSON with one wall-clock time per
`engine.train_batch()` call and the loss it returned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from benchmarks.common import thread_cpu  # noqa: E402
from examples.gpt import GPTConfig, build_gpt  # noqa: E402
from odyssey.data import ArithmeticTokens, Sampler  # noqa: E402
from odyssey.engine import OptimizerConfig  # noqa: E402
from planner.plan import even_partition  # noqa: E402
from profiler.configtree import add_dataclass_args, from_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--num-microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=OptimizerConfig.lr)
    p.add_argument("--optimizer", choices=("torch", "fused"), default="torch",
                   help="torch: torch.optim.AdamW (what Odyssey uses); fused: DeepSpeed's "
                        "FusedAdam (JIT-built C++ op on the CPU accelerator)")
    p.add_argument("--profile", action="store_true",
                   help="also record wall seconds per pipeline instruction type")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    add_dataclass_args(p, GPTConfig, "model", prefix="gpt")
    return p.parse_args(argv)


def ds_config(args: argparse.Namespace) -> dict:
    if args.num_microbatches % args.dp:
        raise SystemExit(f"num_microbatches={args.num_microbatches} must divide by dp={args.dp}")
    opt = OptimizerConfig(lr=args.lr)
    params = {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8,
              "weight_decay": opt.weight_decay}
    if args.optimizer == "torch":
        params["torch_adam"] = True  # torch.optim.AdamW, foreach default, as Odyssey
    return {
        "train_micro_batch_size_per_gpu": args.microbatch_size,
        "gradient_accumulation_steps": args.num_microbatches // args.dp,
        "train_batch_size": args.microbatch_size * args.num_microbatches,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": {"stage": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def data_iter(data: ArithmeticTokens, sampler: Sampler, dp_id: int, dp: int, steps: int):
    """(inputs, targets) of this pipeline's microbatches, step after step, in Odyssey's order."""
    for step in range(steps):
        for mb in range(dp_id, sampler.num_microbatches, dp):
            yield data.batch(sampler.sample_ids(step, mb))


def instrument(engine_cls, op_s: dict[str, float]) -> None:
    """Wrap every pipeline instruction handler with a wall-clock and a thread-CPU timer."""
    for kind, fn in list(engine_cls._INSTRUCTION_MAP.items()):
        def timed(self, *a, _fn=fn, _name=kind.__name__, **kw):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return _fn(self, *a, **kw)
            finally:
                op_s[_name] += time.perf_counter() - t
                op_s["cpu:" + _name] += time.thread_time() - c
        engine_cls._INSTRUCTION_MAP[kind] = timed


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    t_launch = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if world != args.dp * args.pp:
        raise SystemExit(f"world size {world} != dp {args.dp} x pp {args.pp}")

    gpt = from_args(GPTConfig, args, prefix="gpt")
    model = build_gpt(gpt)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # DeepSpeed wants a scalar per microbatch: the mean over its samples.
        return model.loss_fn(logits, targets).mean()

    net = PipelineModule(layers=[model.build_layer(i) for i in range(model.num_layers)],
                         loss_fn=loss_fn, num_stages=args.pp, partition_method="uniform")
    bounds = [0]
    for n in even_partition(model.num_layers, args.pp):
        bounds.append(bounds[-1] + n)
    if list(net.parts) != bounds:
        raise SystemExit(f"DeepSpeed partition {list(net.parts)} != Odyssey's {bounds}")
    engine, _, _, _ = deepspeed.initialize(
        model=net, config=ds_config(args),
        model_parameters=[p for p in net.parameters() if p.requires_grad])
    torch.set_num_threads(1)
    op_s: dict[str, float] = defaultdict(float)
    if args.profile:
        instrument(PipelineEngine, op_s)

    dp_id = engine.grid.get_data_parallel_id()
    sampler = Sampler(args.num_microbatches, args.microbatch_size)
    it = data_iter(ArithmeticTokens(gpt.vocab_size, gpt.seq_len), sampler, dp_id, args.dp,
                   args.steps)
    tdist.barrier()
    setup_s = time.perf_counter() - t_launch
    step_s, period_s, losses, ops = [], [], [], []
    last = time.perf_counter()
    for _ in range(args.steps):
        op_s.clear()
        t, c = time.perf_counter(), time.process_time()
        loss = engine.train_batch(data_iter=it)
        now = time.perf_counter()
        step_s.append(now - t)
        period_s.append(now - last)
        last = now
        losses.append(float(loss))
        if args.profile:  # + the whole step and the process CPU time (all threads) in it
            ops.append({**op_s, "step_s": now - t, "cpu_s": time.process_time() - c})
    all_ops = [None] * world if args.profile else None
    if args.profile:
        tdist.all_gather_object(all_ops, {"steps": ops, "thread_cpu_s": thread_cpu()})
    if rank == 0:
        out = {
            "framework": "deepspeed", "deepspeed": deepspeed.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dp": args.dp, "pp": args.pp, "parts": list(net.parts),
            "optimizer": args.optimizer, "config": ds_config(args),
            "setup_s": setup_s, "step_time_s": step_s, "period_s": period_s,
            "loss": losses,
            "op_seconds": ({str(r): v for r, v in enumerate(all_ops)} if args.profile else None),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    tdist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # process-group destructors can SIGABRT at exit (PLATFORM-NOTES)


if __name__ == "__main__":
    main()

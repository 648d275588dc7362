"""DeepSpeed side of tests/odyssey/test_deepspeed_model.py: train examples/train_ds_pipe.py's model
with DeepSpeed's own `PipelineEngine` (CPU, gloo), started by torchrun:

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 ... tests/workers/ds_pipe_engine.py \
        --ds-config CONFIG.json --steps 6 --out DIR [--pipe-... model sizes]

Data: pipeline d trains microbatches d, d+D, ... of each step (Odyssey's `Plan.uniform`
deal) from the same `Sampler`. Rank 0 writes DIR/deepspeed.json (per-step loss returned by
`train_batch`, the partition); every rank saves its layers' final state as
DIR/layers-rank<r>.pt keyed by global layer index.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from examples.train_ds_pipe import PipeConfig, lm_loss, pipe_layers  # noqa: E402
from odyssey.data import ArithmeticTokens, Sampler  # noqa: E402
from profiler.configtree import add_dataclass_args, from_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ds-config", required=True)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, required=True)
    add_dataclass_args(p, PipeConfig, "model", prefix="pipe")
    args = p.parse_args()
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    cfg = from_args(PipeConfig, args, prefix="pipe")
    config = json.loads(Path(args.ds_config).read_text())
    net = PipelineModule(layers=pipe_layers(cfg), loss_fn=lm_loss, num_stages=args.pp,
                         partition_method="uniform", seed_layers=True, base_seed=cfg.seed)
    engine, _, _, _ = deepspeed.initialize(
        model=net, config=config, model_parameters=[q for q in net.parameters()
                                                    if q.requires_grad])
    torch.set_num_threads(1)
    dp, dp_id = world // args.pp, engine.grid.get_data_parallel_id()
    mbs, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    sampler = Sampler(gas * dp, mbs)
    data = ArithmeticTokens(cfg.vocab_size, cfg.seq_len)

    def batches():
        for step in range(args.steps):
            for mb in range(dp_id, sampler.num_microbatches, dp):
                yield data.batch(sampler.sample_ids(step, mb))

    it = batches()
    losses = [float(engine.train_batch(data_iter=it)) for _ in range(args.steps)]
    args.out.mkdir(parents=True, exist_ok=True)
    start = net._local_start
    states = {start + k: layer.state_dict() for k, layer in enumerate(net.forward_funcs)
              if isinstance(layer, torch.nn.Module)}
    torch.save(states, args.out / f"layers-rank{rank}.pt")
    if rank == 0:
        (args.out / "deepspeed.json").write_text(json.dumps(
            {"loss": losses, "parts": list(net.parts), "deepspeed": deepspeed.__version__,
             "micro_batch": mbs, "gas": gas, "dp": dp}))
    tdist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # process-group destructors can SIGABRT at exit


if __name__ == "__main__":
    main()

"""The example GPT with its head tied to the token embedding, trained like
examples/train_gpt.py (same flags); at the end each rank writes the digests of the tied
members it holds to RUN_DIR/tied-RANK.json, so a test can see they are still one weight.

    odyssey run --standalone --nproc-per-node 4 tests/workers/train_tied_gpt.py --dp 2 --pp 2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from examples.gpt import GPTConfig, build_gpt  # noqa: E402
from examples.train_gpt import parse_args  # noqa: E402
from odyssey.data import ArithmeticTokens  # noqa: E402
from odyssey.env import worker_from_env  # noqa: E402
from odyssey.hooks import FitResult, TrainerHook  # noqa: E402
from odyssey.model import LayeredModel, TiedGroup  # noqa: E402
from odyssey.trainer import Trainer, fit_and_exit  # noqa: E402


def build_tied_gpt(cfg: GPTConfig) -> LayeredModel:
    """The GPT whose output projection is its token embedding (one tied weight): the head
    starts as a copy of layer 0's `tok.weight`, and the tied group keeps them equal."""
    base = build_gpt(cfg)
    last = base.num_layers - 1

    def build_layer(i: int) -> torch.nn.Module:
        layer = base.build_layer(i)
        if i == last:
            with torch.no_grad():
                layer.lm.weight.copy_(base.build_layer(0).tok.weight)
        return layer

    return dataclasses.replace(
        base, name=base.name + "-tied", build_layer=build_layer,
        tied=(TiedGroup("embedding", ((0, "tok.weight"), (last, "lm.weight"))),))


def tied_digests(trainer: Trainer) -> dict[str, str]:
    """'layer:param' -> sha1 of each tied member this rank holds."""
    held = trainer.engine.held
    out = {}
    for g in trainer.model.tied:
        for i, name in g.members:
            if i in held:
                p = held.module(i).get_parameter(name).detach().contiguous()
                out[f"{i}:{name}"] = hashlib.sha1(p.numpy().tobytes()).hexdigest()
    return out


class WriteTiedDigests(TrainerHook):
    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def on_fit_end(self, result: FitResult) -> None:
        t = self.trainer
        (t.run_dir / f"tied-{t.worker.rank}.json").write_text(json.dumps(tied_digests(t)))


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(1)
    model = build_tied_gpt(cfg.gpt)
    data = ArithmeticTokens(cfg.gpt.vocab_size, cfg.gpt.seq_len)
    worker = worker_from_env()
    hook = WriteTiedDigests()

    def make() -> Trainer:
        hook.trainer = Trainer(model, data, cfg, worker, hooks=[hook])
        return hook.trainer

    fit_and_exit(make)


if __name__ == "__main__":
    main()

"""Token files: the prepare command, windows keyed by sample id (epochs, shuffle, held-out
split), the background loader, and exactness against the single-process reference, under
a resume with another batch layout and through a SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch

from examples.gpt import GPTConfig, build_gpt
from odyssey.data import Sampler
from odyssey.engine import expand_ranges
from odyssey.job_config import job_config
from odyssey.optim import OptimizerConfig
from odyssey.prefetch import BatchLoader
from odyssey.prepare import main as prepare_main
from odyssey.report import read_jsonl
from odyssey.testing.reference import reference_run
from odyssey.testing.threads import run_threads
from odyssey.token_data import TokenWindows, open_token_data, read_sidecar
from odyssey.trainer import Trainer
from tests.conftest import ROOT
from tests.helpers import max_rel, run_odyssey

SEQ = 16
MODEL = GPTConfig(vocab_size=256, seq_len=SEQ, d_model=32, n_heads=2, n_blocks=2)


def test_prepare_byte_level_is_the_corpus_bytes(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("héllo wörld")  # no final newline: one is added
    out = tmp_path / "t.bin"
    assert prepare_main([str(tmp_path), "--glob", "*.txt", "--out", str(out)]) == 0
    info = read_sidecar(out)
    assert info["dtype"] == "uint16" and info["vocab_size"] == 256 and info["num_files"] == 2
    tokens = np.fromfile(out, dtype="<u2")
    assert bytes(tokens.astype(np.uint8)) == "héllo wörld\nsecond file\n".encode()
    assert info["num_tokens"] == len(tokens)


def test_prepare_bpe_trains_locally_and_round_trips(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path / "bpe.bin"
    assert prepare_main([str(ROOT / "odyssey" / "token_data.py"), "--out", str(out),
                         "--tokenizer", "bpe", "--vocab-size", "400"]) == 0
    info = read_sidecar(out)
    assert info["tokenizer"] == "bpe" and info["vocab_size"] <= 400
    ids = np.fromfile(out, dtype="<u2")
    assert ids.max() < info["vocab_size"] and len(ids) < info["num_bytes"]  # it merged
    tok = tokenizers.Tokenizer.from_file(str(out) + ".tokenizer.json")
    text = (ROOT / "odyssey" / "token_data.py").read_text()
    assert tok.decode(ids.tolist()) == text


def test_windows_are_a_pure_function_of_the_sample_id(corpus):
    data = open_token_data(corpus, SEQ, val_fraction=0.1, seed=3)
    train, val = data.train, data.val
    assert data.vocab_size == 256
    n = train.num_windows
    # every epoch visits every window once, in an order keyed by (seed, epoch)
    for epoch in (0, 1):
        seen = sorted(train.window(s) for s in range(epoch * n, (epoch + 1) * n))
        assert seen == list(range(n))
    assert [train.window(s) for s in range(8)] != [train.window(n + s) for s in range(8)]
    again = open_token_data(corpus, SEQ, val_fraction=0.1, seed=3).train
    ids = [0, 5, n - 1, n, 3 * n + 7]
    x, y = train.batch(ids)
    x2, y2 = again.batch(ids)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.dtype == torch.int64 and x.shape == (len(ids), SEQ)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    tokens = np.asarray(train.tokens)
    w = train.window(ids[2])
    assert x[2].tolist() == tokens[w * SEQ:w * SEQ + SEQ].tolist()
    # held out: validation tokens follow the training ones and are never trained on
    assert len(train.tokens) + len(val.tokens) == data.info["num_tokens"]
    assert (train.num_windows + 1) * SEQ >= len(train.tokens) - SEQ
    unshuffled = TokenWindows(train.tokens, SEQ, shuffle=False)
    assert [unshuffled.window(s) for s in range(3)] == [0, 1, 2]


class SlowData:
    """Data whose batches take `delay_s` to load; counts loads per thread."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.loads: dict[str, int] = {}

    def batch(self, ids):
        name = threading.current_thread().name
        self.loads[name] = self.loads.get(name, 0) + 1
        time.sleep(self.delay_s)
        return self.inner.batch(ids)


def test_loader_prepares_ahead_and_serves_the_right_samples(corpus):
    train = open_token_data(corpus, SEQ).train
    sampler = Sampler(num_microbatches=4, microbatch_size=2)
    for depth in (0, 2):
        data = SlowData(train, 0.01)
        loader = BatchLoader(data, sampler, depth, needs=lambda: (True, False))
        waits = []
        for step in range(6):
            time.sleep(0.05)  # "compute": the thread fills the next steps meanwhile
            for mb in (1, 3):  # this rank's microbatches
                ids = sampler.sample_ids(step, mb)
                x, y = loader.batch(ids)
                assert torch.equal(x, train.batch(ids)[0])
                assert y.numel() == 0  # a first stage only: targets are never kept
            waits.append(loader.take_wait_s())
        loader.close()
        if depth == 0:
            assert loader.misses == 12 and min(waits) >= 0.02
        else:  # only step 0 waits; later batches were prepared in the background
            assert loader.misses == 2 and max(waits[1:]) < 0.01
            assert data.loads.get("odyssey-batch-loader", 0) >= 10


def test_loader_recovers_when_the_microbatches_change(corpus):
    train = open_token_data(corpus, SEQ).train
    sampler = Sampler(4, 2)
    loader = BatchLoader(train, sampler, 1)
    for mb in (0, 1):
        loader.batch(sampler.sample_ids(0, mb))
    time.sleep(0.05)
    for mb in (0, 2, 3):  # after a recovery this rank runs other microbatches
        ids = sampler.sample_ids(1, mb)
        assert torch.equal(loader.batch(ids)[0], train.batch(ids)[0])
    assert loader.misses == 2 + 2  # step 0, then the two unforeseen microbatches
    loader.close()


def _job(run_dir, corpus, **kw):
    cfg = job_config(run_dir=str(run_dir), log_every=100, progress="off", **kw)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(corpus)))


def _train(cfg, world: int):
    data = cfg.data.open(SEQ)
    model = build_gpt(MODEL)

    def worker(w):
        t = Trainer(model, data.train, cfg, w)
        return t.fit(), t.engine.held.weights()

    return run_threads(world, worker, 150)


@pytest.mark.timeout(200)
def test_token_data_training_matches_the_reference(corpus, tmp_path):
    cfg = _job(tmp_path / "run", corpus, steps=5, dp=2, pp=2, num_microbatches=4,
               microbatch_size=2)
    fit = _train(cfg, 4)[0][0]
    ref, _ = reference_run(build_gpt(MODEL), cfg.data.open(SEQ).train, Sampler(4, 2), 5,
                           cfg.optimizer, total_steps=5)
    assert max(max_rel(fit.losses[k], ref[k]) for k in range(5)) <= 1e-5
    assert fit.report["samples"]["lost"] == 0 and fit.report["samples"]["duplicated"] == 0
    waits = [m["data_wait_s"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert len(waits) == 5 and all(w >= 0 for w in waits)


@pytest.mark.timeout(240)
def test_resume_under_another_batch_layout_continues_after_the_consumed_samples(
        corpus, tmp_path):
    run = tmp_path / "run"
    first = _job(run, corpus, steps=6, dp=2, pp=1, num_microbatches=4, microbatch_size=2,
                 checkpoint_every=3)
    _train(first, 2)  # steps 0..5, 8 samples each: 48 consumed at the step-5 checkpoint
    meta = json.loads((run / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["samples_consumed"] == 48 and meta["next_step"] == 6
    second = _job(run, corpus, steps=10, dp=2, pp=1, num_microbatches=2, microbatch_size=3)
    fit = _train(second, 2)[0][0]
    ledger = {r["step"]: sorted(expand_ranges(r["samples"]))
              for r in read_jsonl(run / "ledger.jsonl")}
    assert sorted(ledger) == list(range(10))
    assert ledger[5] == list(range(40, 48))
    assert ledger[6] == list(range(48, 54)) and ledger[9] == list(range(66, 72))
    s = fit.report["samples"]
    assert s == {"expected": 48 + 4 * 6, "trained": 72, "lost": 0, "duplicated": 0,
                 "unexpected": 0}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_token_data_through_a_sigkill(corpus, tmp_path):
    """`odyssey run` of the pretraining example on the token file (its recipe in fp32:
    warmup + cosine, weight decay, clipping), rank 3 SIGKILLed mid-run."""
    run_dir = tmp_path / "run"
    steps = 12
    args = ["--model", "gpt", "--data", str(corpus), "--steps", str(steps), "--dp", "2",
            "--pp", "2", "--num-microbatches", "4", "--microbatch-size", "2",
            "--seq-len", str(SEQ), "--gpt-d-model", "32", "--gpt-n-heads", "2",
            "--gpt-n-blocks", "2", "--lr", "3e-3", "--lr-schedule", "cosine",
            "--warmup-steps", "3", "--min-lr-ratio", "0.1", "--weight-decay", "0.1",
            "--grad-clip", "0.5", "--precision", "fp32", "--eval-every", "0",
            "--log-every", "100", "--inject", "kill:rank=3,step=5,phase=backward"]
    run_odyssey(4, run_dir, "pretrain_llama.py", args, ["--finish-grace", "20"], 220)
    report = json.loads((run_dir / "report.json").read_text())
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    cfg = _job(run_dir, corpus, steps=steps, num_microbatches=4, microbatch_size=2)
    recipe = OptimizerConfig(lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=3,
                             min_lr_ratio=0.1, grad_clip=0.5)
    ref, _ = reference_run(build_gpt(MODEL), cfg.data.open(SEQ).train, Sampler(4, 2), steps,
                           recipe, total_steps=steps)
    assert sorted(losses) == list(range(steps))
    assert max(max_rel(losses[k], ref[k]) for k in range(steps)) <= 1e-5
    s = report["samples"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["trained"] == s["expected"]
    assert report["replicas_identical"] is True
    assert [e["ranks_lost"] for e in report["events"] if e["kind"] == "recovery"] == [[3]]

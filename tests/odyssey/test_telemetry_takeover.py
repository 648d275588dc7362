"""A new leader fills the ledger and metrics line of the step its predecessor committed
but did not log, from the votes in the store: the same fields a normal line has."""

from __future__ import annotations

import json
from datetime import timedelta

import torch.distributed as dist

from odyssey import contract
from odyssey.job_config import job_config
from odyssey.optim import lr_at
from odyssey.report import read_jsonl
from odyssey.telemetry import Telemetry


def test_take_over_writes_loss_lr_and_grad_norm(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=10))
    job = job_config(steps=20, lr=1e-3, lr_schedule="cosine", warmup_steps=4)
    votes = {0: {"samples": [0, 1], "loss_sum": 3.0, "sumsq": 9.0},
             1: {"samples": [2, 3], "loss_sum": 5.0, "sumsq": 16.0}}
    for r, v in votes.items():
        store.set(contract.vote_key(0, 7, r), json.dumps(v))
    tel = Telemetry(job, tmp_path, store, rank=1, global_batch=4)
    tel.take_over(7, 0, [0, 1])
    [line] = read_jsonl(tmp_path / contract.METRICS_FILE)
    assert line["step"] == 7 and line["recovered_by_new_leader"] is True
    assert line["loss"] == 2.0 and line["grad_norm"] == 5.0
    assert line["lr"] == lr_at(job.optimizer.resolved(20), 7)
    [ledger] = read_jsonl(tmp_path / contract.LEDGER_FILE)
    assert ledger["samples"] == [0, 1, 2, 3]
    tel.take_over(7, 0, [0, 1])  # already logged: nothing added
    assert len(read_jsonl(tmp_path / contract.METRICS_FILE)) == 1

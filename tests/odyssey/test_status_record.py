"""The leader's status record (odyssey/status.py): what it holds after a failure-free run
(ranks as threads), and a new leader continuing its predecessor's counts."""

from __future__ import annotations

import json

from torch.distributed import HashStore

from odyssey import contract
from odyssey.job_config import job_config
from odyssey.status import StatusPublisher
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.helpers import tiny_model


def test_record_of_a_run(tmp_path):
    cfg = job_config(dp=2, pp=2, steps=6, num_microbatches=4, microbatch_size=2,
                     log_every=100, progress="off", run_dir=str(tmp_path),
                     checkpoint_every=3)

    def worker(w):
        model, data = tiny_model()
        return Trainer(model, data, cfg, w).fit()

    run_threads(4, worker, timeout_s=120)
    rec = json.loads((tmp_path / contract.STATUS_FILE).read_text())
    assert rec["state"] == "finished" and rec["step"] == 5 and rec["steps"] == 6
    assert rec["generation"] == 0 and rec["leader"] == 0
    assert [m["rank"] for m in rec["members"]] == [0, 1, 2, 3]
    assert rec["plan"]["pipelines"] == 2 and rec["plan"]["stages"] == [2, 2]
    assert rec["plan"]["ranks"] == 4
    assert rec["plan"]["kind"] == "initial" and rec["plan"]["global_batch"] == 8
    assert rec["steps_per_s"] > 0 and abs(rec["samples_per_s"] / rec["steps_per_s"] - 8) < 1e-6
    assert rec["recoveries"] == [] and rec["recovery_counts"] == [] and rec["fenced"] == []
    assert rec["checkpoint"]["step"] == 5  # steps 2 and 5 were checkpointed
    assert rec["mode"] == "real" and rec["prometheus_addr"] == ""


def test_a_new_leader_continues_the_record():
    store = HashStore()
    old = {"recovery_counts": [{"kind": "reroute", "cause": "failure", "count": 2}],
           "recoveries": [{"generation": 2, "mttr_s": 0.1}], "fenced": [3],
           "checkpoint": {"step": 9, "time": 1.0}, "generation": 2, "step": 11}
    store.set(contract.STATUS_RECORD, json.dumps(old))
    rec = StatusPublisher(store, 1, None, mode="real", steps=20)._take_record()
    assert rec["recovery_counts"] == old["recovery_counts"]
    assert rec["recoveries"] == old["recoveries"] and rec["fenced"] == [3]
    assert rec["checkpoint"] == old["checkpoint"]
    assert rec["step"] is None  # its own steps: set at its first commit

"""Checkpoints that verify themselves: a damaged newest checkpoint is skipped (and said so),
the job resumes from the newest one that verifies, on the failure-free trajectory; peer
copies survive the loss of one rank's files; an interrupted write is never loaded."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from odyssey import checkpoint as ckpt
from odyssey import contract
from odyssey.job_config import job_config
from odyssey.report import read_jsonl
from tests.helpers import max_rel, reference, run_plan

BASE = dict(num_microbatches=4, microbatch_size=2, log_every=100, checkpoint_every=3,
            dp=1, pp=2)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_text("{ not json")


DAMAGE = {
    "truncated-layer": ("layer_0003.pt", truncate),
    "corrupt-layer": ("layer_0001.pt", corrupt),
    "deleted-layer": ("layer_0002.pt", lambda p: p.unlink()),
    "garbage-meta": (contract.CHECKPOINT_META, garbage),
    "garbage-manifest": (contract.CHECKPOINT_MANIFEST, garbage),
}


def check_resumed_run(tmp_path, res, first_step: int, steps: int) -> dict:
    ref, _ = reference(job_config(steps=steps, **BASE))
    assert sorted(res.losses) == list(range(first_step, steps))
    assert max(max_rel(res.losses[k], ref[k]) for k in res.losses) <= 1e-5
    report = json.loads((tmp_path / contract.REPORT_FILE).read_text())
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    return report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_newest_verified(tmp_path, capsys, damage):
    base = dict(BASE, run_dir=str(tmp_path))
    run_plan(job_config(steps=8, **base), 2)
    root = tmp_path / contract.CHECKPOINT_DIR
    # every 3 steps (2, 5) and at the end (7); the 2 newest are kept
    assert ckpt.complete_steps(root, 4) == [5, 7]
    name, hurt = DAMAGE[damage]
    bad = root / contract.checkpoint_step_dir(7) / name
    hurt(bad)
    assert ckpt.latest_step(root, 4) == 5
    capsys.readouterr()
    res, _ = run_plan(job_config(steps=11, **base), 2)
    check_resumed_run(tmp_path, res, 6, 11)
    out = capsys.readouterr().out
    assert "skipping checkpoint of step 7" in out and "resumed from checkpoint of step 5" in out
    skipped = [e for e in read_jsonl(tmp_path / contract.EVENTS_FILE)
               if e["kind"] == "checkpoint_skipped"]
    assert [e["checkpoint_step"] for e in skipped] == [7]
    assert skipped[0]["resumed_from"] == 5 and any(name in p for p in skipped[0]["problems"])


@pytest.mark.timeout(120)
def test_final_checkpoint_means_a_rerun_redoes_nothing(tmp_path):
    base = dict(BASE, run_dir=str(tmp_path))
    run_plan(job_config(steps=7, **base), 2)  # periodic at 2 and 5, the end at 6
    assert ckpt.latest_step(tmp_path / contract.CHECKPOINT_DIR, 4) == 6
    res, _ = run_plan(job_config(steps=9, **base), 2)
    check_resumed_run(tmp_path, res, 7, 9)


@pytest.mark.timeout(120)
def test_peer_copies_survive_losing_one_ranks_files(tmp_path):
    base = dict(BASE, run_dir=str(tmp_path))
    cfg = job_config(steps=6, **base)
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, peer_copy=True))
    run_plan(cfg, 2)
    root = tmp_path / contract.CHECKPOINT_DIR
    step5 = root / contract.checkpoint_step_dir(5)
    # rank 1 (pp stage 1: layers 2, 3) loses its node: its files and its peer directory
    for i in (2, 3):
        (step5 / contract.checkpoint_layer_file(i)).unlink()
    shutil.rmtree(ckpt.peer_root(root, 1))
    assert ckpt.latest_step(root, 4) == 5  # layers 2, 3 are found in rank 0's peer copies
    good, _ = ckpt.verify(root, 5, 4)
    assert good.files[contract.checkpoint_layer_file(2)].is_relative_to(ckpt.peer_root(root, 0))
    res, _ = run_plan(replace(cfg, training=replace(cfg.training, steps=9)), 2)
    check_resumed_run(tmp_path, res, 6, 9)


@pytest.mark.timeout(60)
def test_interrupted_write_leaves_no_loadable_checkpoint(tmp_path):
    state = {0: {"w": torch.ones(3)}}
    saver = ckpt.Checkpointer(tmp_path, timeout_s=0.2)
    # rank 1 is a writer of this step but never reports (killed mid-write)
    saver.save(4, 0, state, writers=[0, 1], meta={"num_layers": 1, "next_step": 5})
    assert saver.flush() is None
    assert not (tmp_path / contract.checkpoint_step_dir(4) / contract.CHECKPOINT_MANIFEST).exists()
    assert ckpt.latest_step(tmp_path, 1) is None
    good, problems = ckpt.verify(tmp_path, 4, 1)
    assert good is None and "no manifest" in problems[0]


@pytest.mark.timeout(60)
def test_retention_never_deletes_the_last_verified_checkpoint(tmp_path):
    saver = ckpt.Checkpointer(tmp_path, keep=1)
    for step in (1, 3):
        saver.save(step, 0, {0: {"w": torch.full((2,), float(step))}}, writers=[0],
                   meta={"num_layers": 1, "next_step": step + 1})
        saver.flush()
    assert ckpt.complete_steps(tmp_path, 1) == [3]
    # a newer write that never completes does not push out the verified one
    saver = ckpt.Checkpointer(tmp_path, keep=1, timeout_s=0.1)
    saver.save(5, 1, {0: {"w": torch.zeros(2)}}, writers=[0, 1],
               meta={"num_layers": 1, "next_step": 6})
    saver.flush()
    assert ckpt.complete_steps(tmp_path, 1) == [3]
    assert ckpt.load_layer(tmp_path, 3, 0)["w"].tolist() == [3.0, 3.0]

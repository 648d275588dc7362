"""Per-layer checkpoints: saved under one plan, loaded under another, same trajectory."""

import json
from dataclasses import replace

import pytest

from odyssey import checkpoint as ckpt
from odyssey.job_config import job_config
from tests.helpers import max_rel, reference, run_plan


def no_end_checkpoint(cfg):
    """As if the run ended in a crash: only the periodic checkpoints exist."""
    return replace(cfg, checkpoint=replace(cfg.checkpoint, at_end=False))


@pytest.mark.timeout(120)
def test_checkpoint_from_one_plan_continues_under_another(tmp_path):
    base = dict(num_microbatches=4, microbatch_size=2, run_dir=str(tmp_path), log_every=100,
                checkpoint_every=5)
    ref_losses, _ = reference(job_config(steps=24, **base))
    first, _ = run_plan(no_end_checkpoint(job_config(steps=12, dp=2, pp=2, **base)), 4)
    # 5-step interval: checkpoints after steps 4 and 9; 12 steps ran, 10 and 11 are lost
    assert ckpt.complete_steps(tmp_path / "checkpoints", 4) == [4, 9]
    assert ckpt.read_meta(tmp_path / "checkpoints", 9)["next_step"] == 10
    second, _ = run_plan(no_end_checkpoint(job_config(steps=24, dp=1, pp=4, **base)), 4)
    assert sorted(second.losses) == list(range(10, 24))
    for k in range(24):
        got = first.losses[k] if k < 10 else second.losses[k]
        assert max_rel(got, ref_losses[k]) <= 1e-5, f"step {k}"
    report = json.loads((tmp_path / "report.json").read_text())
    # steps 10 and 11 of the first run were rolled back: no sample counted twice
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    assert [e["checkpoint_step"] for e in report["events"] if e["kind"] == "resume"] == [9]
    # old checkpoints are pruned once two newer complete ones exist
    kept = ckpt.complete_steps(tmp_path / "checkpoints", 4)
    assert kept[-2:] == [14, 19] and 4 not in kept


@pytest.mark.timeout(120)
def test_incomplete_checkpoint_is_ignored_and_single_rank_resumes(tmp_path):
    base = dict(num_microbatches=4, microbatch_size=2, run_dir=str(tmp_path), log_every=100,
                checkpoint_every=3)
    run_plan(job_config(steps=6, dp=1, pp=2, **base), 2)
    root = tmp_path / "checkpoints"
    assert ckpt.complete_steps(root, 4) == [2, 5]
    (root / "step_00000005" / "layer_0003.pt").unlink()  # as if a writer died mid-save
    assert ckpt.latest_step(root, 4) == 2
    res, _ = run_plan(job_config(steps=8, dp=1, pp=1, **base), 1)
    assert sorted(res.losses) == [3, 4, 5, 6, 7]
    ref_losses, _ = reference(job_config(steps=8, **base))
    assert max(max_rel(res.losses[k], ref_losses[k]) for k in res.losses) <= 1e-5

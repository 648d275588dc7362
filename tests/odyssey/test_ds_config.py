"""DeepSpeed JSON configs: the batch triangle and optimizer map onto Odyssey's config, and
anything Odyssey would not honour exactly is an error that names the key and numbers.

No deepspeed needed: the config is plain JSON.
"""

from __future__ import annotations

import json

import pytest

from examples.gpt import GPTConfig, build_gpt
from odyssey import ds_config
from odyssey.data import ArithmeticTokens
from odyssey.job_config import job_config
from odyssey.testing.threads import run_threads
from odyssey.trainer import Trainer
from tests.helpers import DS_CONFIG

CONFIG = DS_CONFIG


def test_config_maps_batch_triangle_and_optimizer():
    s = ds_config.settings(CONFIG, dp=1)
    assert (s.microbatch_size, s.num_microbatches, s.gradient_accumulation_steps) == (2, 4, 4)
    assert s.optimizer.lr == 3e-3 and s.optimizer.betas == (0.9, 0.95)
    # two of three sizes fix the third; DP multiplies the microbatch count
    assert ds_config.settings({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4},
                              dp=2).num_microbatches == 8
    s = ds_config.settings({"train_batch_size": 24, "gradient_accumulation_steps": 3}, dp=2)
    assert (s.microbatch_size, s.num_microbatches, s.optimizer) == (4, 6, None)
    # missing optimizer params mean what they mean to DeepSpeed
    o = ds_config.optimizer({"optimizer": {"type": "Adam", "params": {}}})
    assert (o.lr, o.betas, o.weight_decay) == (1e-3, (0.9, 0.999), 0.0)  # FusedAdam's
    o = ds_config.optimizer({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert o.weight_decay == 0.01  # torch.optim.AdamW's


@pytest.mark.parametrize("change, message", [
    ({"train_batch_size": 12}, r"train_batch_size 12 != train_micro_batch_size_per_gpu 2 x "
                               r"gradient_accumulation_steps 4 x data-parallel pipelines 1 "
                               r"\(= 8\)"),
    ({"train_micro_batch_size_per_gpu": 0}, "must be a positive integer, got 0"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a number >= 0"),
    ({"fp16": {"enabled": True}}, r"fp16.hysteresis 2 \(DeepSpeed's default is 2\)"),
    ({"fp16": {"enabled": True, "hysteresis": 1, "loss_scale": 128}}, "static loss scale"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "choose one"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, "optimizer.type 'SGD'"),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, r"\['amsgrad'\]"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler is not supported .* --lr-schedule"),
    ({"zero_optimization": {"stage": 3}}, "stage 3"),
    ({"curriculum_learning": {}}, r"keys \['curriculum_learning'\] are not supported"),
])
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(ds_config.DSConfigError, match=message):
        ds_config.settings({**CONFIG, **change}, dp=1)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ds_config.DSConfigError, match="bad.json is not valid JSON"):
        ds_config.settings(bad, dp=1)
    with pytest.raises(ds_config.DSConfigError, match="cannot read DeepSpeed config"):
        ds_config.settings(tmp_path / "missing.json", dp=1)
    # 2 pipelines: 8 = 2 x 4 x 2 does not hold -> the trainer refuses before training
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    gpt = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=1)
    model, data = build_gpt(gpt), ArithmeticTokens(gpt.vocab_size, gpt.seq_len)
    cfg = job_config(steps=1, dp=2, pp=1, ds_config=str(path), run_dir=str(tmp_path / "r"))
    with pytest.raises(RuntimeError, match=r"data-parallel pipelines 2 \(= 16\)"):
        run_threads(2, lambda w: Trainer(model, data, cfg, w).fit(), timeout_s=30)


def test_clipping_and_precision_map_onto_the_job(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**CONFIG, "gradient_clipping": 0.5, "bf16": {"enabled": True}}))
    job = job_config(steps=4, grad_clip=2.0, ds_config=str(path))
    mapped = ds_config.apply(job, world_size=1)
    assert mapped.optimizer.grad_clip == 0.5 and mapped.precision.dtype == "bf16"
    no_clip_key = {k: v for k, v in CONFIG.items() if k != "gradient_clipping"}
    path.write_text(json.dumps(no_clip_key))  # no clipping key: the flag's value stays
    assert ds_config.apply(job, world_size=1).optimizer.grad_clip == 2.0
    fp16 = ds_config.settings({**CONFIG, "fp16": {"enabled": True, "hysteresis": 1,
                                                  "initial_scale_power": 12,
                                                  "loss_scale_window": 200}}, dp=1)
    assert fp16.precision.dtype == "fp16" and fp16.precision.init_scale == 2.0 ** 12
    assert fp16.precision.growth_interval == 200
    assert ds_config.settings(CONFIG, dp=1).precision is None

"""`odyssey export`: what it refuses, and the plain (non-HF) consolidated state dict.

The HF path (from_pretrained, logits and eval loss) is tested after a kill in
test_hf_pipeline.py.
"""

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from launch.cli import main as odyssey  # noqa: E402
from odyssey import contract  # noqa: E402
from odyssey.hf import HFModelError, hf_state_dict  # noqa: E402
from odyssey.hf.adapter import HEAD_PARAM  # noqa: E402
from odyssey.job_config import job_config  # noqa: E402
from tests.helpers import run_plan  # noqa: E402
from tests.workers.train_hf import TinyHF, tiny_hf_model  # noqa: E402


def test_untied_embeddings_are_not_exported_as_tied():
    model, _ = tiny_hf_model(TinyHF("llama", tied=True))
    layers = {i: model.build_layer(i).state_dict() for i in range(model.num_layers)}
    assert HEAD_PARAM not in hf_state_dict(model.hf_config, layers)  # HF re-ties on load
    layers[model.num_layers - 1][HEAD_PARAM] = layers[model.num_layers - 1][HEAD_PARAM] + 1e-3
    with pytest.raises(HFModelError, match="silently untied"):
        hf_state_dict(model.hf_config, layers)


def test_missing_layers_are_refused():
    model, _ = tiny_hf_model(TinyHF("gpt2"))
    with pytest.raises(HFModelError, match="expected layers"):
        hf_state_dict(model.hf_config, {0: model.build_layer(0).state_dict()})


def test_export_without_a_checkpoint_says_so(tmp_path, capsys):
    assert odyssey(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow  # a 2-rank threads run
@pytest.mark.timeout(120)
def test_plain_model_exports_one_state_dict(tmp_path, capsys):
    cfg = job_config(steps=4, dp=1, pp=2, num_microbatches=2, microbatch_size=2,
                     run_dir=str(tmp_path), checkpoint_every=2, log_every=100)
    _, states = run_plan(cfg, 2)
    out = tmp_path / "export"
    assert odyssey(["export", str(tmp_path), "--out", str(out)]) == 0
    assert "exported step 3" in capsys.readouterr().out
    weights = load_file(str(out / contract.EXPORT_WEIGHTS_FILE))
    expected = {f"layers.{i}.{k}": v for i, (sd, *_) in states.items() for k, v in sd.items()}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not (out / "config.json").exists()
    assert odyssey(["export", str(tmp_path), "--step", "0", "--out", str(out)]) == 1
    assert "complete: [1, 3]" in capsys.readouterr().err

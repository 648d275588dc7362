"""The Hugging Face adapter builds layer by layer exactly the model `transformers` builds.

Checked per family (Llama, Qwen2, GPT-2; tied and untied): the chained layers compute
the same logits as the `*ForCausalLM` holding the same weights, each layer holds only its
own parameters, layers are deterministic, and tied embeddings start equal. No
processes, no downloads.
"""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from odyssey.hf import HFModelError, from_hf_config, hf_state_dict  # noqa: E402
from odyssey.hf.adapter import EMBED_PARAM, HEAD_PARAM, TIED_NAME  # noqa: E402
from tests.workers.train_hf import TinyHF, hf_config, tiny_hf_model  # noqa: E402

CASES = [TinyHF("llama", tied=False), TinyHF("llama", tied=True), TinyHF("qwen2", tied=False),
         TinyHF("gpt2", tied=True), TinyHF("gpt2", tied=False, blocks=3)]


def _layers(model):
    return [model.build_layer(i) for i in range(model.num_layers)]


def _hf_model(model, layers):
    ref = AutoModelForCausalLM.from_config(model.hf_config)
    ref.load_state_dict(hf_state_dict(model.hf_config,
                                      {i: m.state_dict() for i, m in enumerate(layers)}),
                        strict=not model.hf_config.tie_word_embeddings)
    if model.hf_config.tie_word_embeddings:
        assert ref.lm_head.weight is ref.get_input_embeddings().weight
    return ref.eval()


def _case_id(t: TinyHF) -> str:
    return f"{t.family}-{'tied' if t.tied else 'untied'}"


@pytest.mark.parametrize("tiny", CASES, ids=_case_id)
def test_layers_compute_the_hf_model(tiny):
    model, data = tiny_hf_model(tiny)
    assert model.num_layers == tiny.blocks + 2
    layers = _layers(model)
    ref = _hf_model(model, layers)
    x, y = data.batch(list(range(3)))
    h = x
    for layer in layers:
        h = layer(h)
    with torch.no_grad():
        logits = ref(input_ids=x).logits
    torch.testing.assert_close(h, logits, rtol=0, atol=1e-6)
    loss = model.loss_fn(h, y)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.mean(), torch.nn.functional.cross_entropy(
        logits.reshape(-1, tiny.vocab_size), y.reshape(-1)), rtol=1e-6, atol=0)
    # the layers together hold the HF model's parameters, a tied matrix in both end layers
    per_layer = [sum(p.numel() for p in m.parameters()) for m in layers]
    tied_extra = tiny.vocab_size * tiny.hidden if tiny.tied else 0
    assert sum(per_layer) == sum(p.numel() for p in ref.parameters()) + tied_extra


@pytest.mark.parametrize("tiny", CASES[:2] + CASES[3:4], ids=lambda t: t.family)
def test_layers_are_deterministic_and_tied_embeddings_start_equal(tiny):
    model, _ = tiny_hf_model(tiny)
    a, b = _layers(model), _layers(model)
    for la, lb in zip(a, b):
        for (k, va), (_, vb) in zip(la.state_dict().items(), lb.state_dict().items()):
            assert torch.equal(va, vb), k
    last = model.num_layers - 1
    if tiny.tied:
        assert [(g.name, g.members) for g in model.tied] == [
            (TIED_NAME, ((0, EMBED_PARAM), (last, HEAD_PARAM)))]
        assert torch.equal(a[0].tokens.weight, a[last].lm_head.weight)
    else:
        assert model.tied == ()
        assert not torch.equal(a[0].tokens.weight, a[last].lm_head.weight)
    # another seed, other weights
    other, _ = tiny_hf_model(TinyHF(tiny.family, tied=tiny.tied, seed=1))
    assert not torch.equal(other.build_layer(0).tokens.weight, a[0].tokens.weight)


def test_build_layer_allocates_only_that_layer():
    # ~1.1 B parameters (4.4 GB in fp32) if it were built whole: one block is ~13 M
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=80, num_attention_heads=16, num_key_value_heads=8,
                      max_position_embeddings=64)
    model = from_hf_config(cfg, seq_len=64)
    assert model.num_layers == 82
    block = model.build_layer(40)
    params = list(block.parameters())
    assert all(p.device.type == "cpu" for p in params)
    d, kv, ff = 1024, 8 * 64, 2816
    assert sum(p.numel() for p in params) == 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    with pytest.raises(IndexError):
        model.build_layer(82)


def test_dropout_is_switched_off_and_the_callers_config_untouched():
    cfg = hf_config(TinyHF("gpt2"))
    assert cfg.resid_pdrop > 0
    model = from_hf_config(cfg, seq_len=16)
    assert model.hf_config.resid_pdrop == 0.0 and model.hf_config.attn_pdrop == 0.0
    assert cfg.resid_pdrop > 0


def test_sequence_longer_than_the_model_is_refused():
    with pytest.raises(HFModelError, match="max_position_embeddings"):
        from_hf_config(hf_config(TinyHF("gpt2")), seq_len=17)

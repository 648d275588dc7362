"""A Hugging Face causal LM, built from its config, as a `LayeredModel`.

    model = from_hf_config(LlamaConfig(...), seq_len=256)   # or GPT2Config, Qwen2Config, ...

Layer 0 is the embedding (token, plus position for GPT-2), layers 1..L the decoder
blocks, layer L+1 the final norm and LM head. The whole model is constructed once on
the `meta` device (no memory); `build_layer(i)` deep-copies only layer i's modules from
that skeleton, materialises them on CPU and initialises them from a generator seeded
by (seed, i), so a rank allocates exactly the layers it holds, and any rank rebuilds a
layer it adopts with the same initial weights.

Tied input/output embeddings (`config.tie_word_embeddings`, GPT-2's default) become a
`TiedGroup` over layer 0's `tokens.weight` and the head's `lm_head.weight`: both are
drawn from one generator, so they start equal, and the engine sums their gradients, so
they stay equal. Dropout is switched off in the adapter's copy of the config (a step's
numbers must not depend on which rank runs a microbatch). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from odyssey import contract
from odyssey.hf.layers import (
    HFBlock,
    HFEmbedding,
    HFHead,
    gpt2_scaled_std,
    seeded_hf_init_,
    shared_matrix,
)
from odyssey.model import LayeredModel, TensorSpec, TiedGroup, layer_seed

TIED_NAME = "word_embeddings"
"""Name of the tied group of the input and output embeddings."""
EMBED_PARAM = "tokens.weight"
"""The token-embedding matrix in layer 0."""
HEAD_PARAM = "lm_head.weight"
"""The output projection in the last layer."""
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
                  "attn_pdrop", "summary_first_dropout", "dropout", "activation_dropout")
"""Config fields zeroed by the adapter (see the module docstring)."""


class HFModelError(ValueError):
    """A Hugging Face model the adapter cannot run as given."""


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its parts (attribute paths in the *ForCausalLM)."""

    embed: str
    blocks: str
    norm: str
    head: str = "lm_head"
    pos_embed: str | None = None
    """Learned position embedding (GPT-2); None for rotary models."""
    rotary: str | None = None
    """The rotary-embedding module (rebuilt per block layer: it has no parameters)."""
    scaled: tuple[str, ...] = ()
    """Parameter name suffixes with GPT-2's depth-scaled init."""


LLAMA_STYLE = Family(embed="model.embed_tokens", blocks="model.layers", norm="model.norm",
                     rotary="model.rotary_emb")
GPT2_STYLE = Family(embed="transformer.wte", blocks="transformer.h", norm="transformer.ln_f",
                    pos_embed="transformer.wpe", scaled=("c_proj.weight",))
FAMILIES = {"llama": LLAMA_STYLE, "mistral": LLAMA_STYLE, "qwen2": LLAMA_STYLE,
            "qwen3": LLAMA_STYLE, "gpt2": GPT2_STYLE}
"""Model types known to work (tests cover llama, qwen2 and gpt2); others are accepted
when their structure matches one of the two layouts."""


@dataclass
class HFLayeredModel(LayeredModel):
    """A `LayeredModel` that came from a Hugging Face config (export needs the config)."""

    hf_config: PretrainedConfig | None = None
    """The config the layers were built from (dropout off, attention implementation set)."""


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def family_of(skeleton: nn.Module) -> Family:
    """The layout of a built (meta) *ForCausalLM, by model type, else by structure."""
    fam = FAMILIES.get(skeleton.config.model_type)
    if fam is None:
        fam = next((f for f in (LLAMA_STYLE, GPT2_STYLE)
                    if all(_has(skeleton, p) for p in (f.embed, f.blocks, f.norm, f.head))), None)
    if fam is None:
        raise HFModelError(
            f"model type {skeleton.config.model_type!r} ({type(skeleton).__name__}) has "
            f"neither the Llama layout (model.embed_tokens/layers/norm) nor GPT-2's "
            f"(transformer.wte/h/ln_f); supported: {sorted(FAMILIES)}")
    return fam


def meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """The whole *ForCausalLM on the meta device: structure, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token cross-entropy, shape [microbatch]."""
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(b * t),
                         reduction="none")
    return ce.view(b, t).mean(dim=1)


def _materialise(template: nn.Module) -> nn.Module:
    module = copy.deepcopy(template).to_empty(device="cpu")
    buffers = [n for n, _ in module.named_buffers()]
    if buffers:  # to_empty leaves them uninitialised; rebuilt parts only (rotary) may have any
        raise HFModelError(f"{type(template).__name__} has buffers {buffers}; the adapter "
                           "only materialises parameters")
    return module


class _LayerBuilder:
    """`build_layer` of an adapted model: layer i from the skeleton, seeded."""

    def __init__(self, config: PretrainedConfig, seed: int):
        self.seed = seed
        self.skeleton = meta_skeleton(config)
        self.config = self.skeleton.config  # with the attention implementation resolved
        self.family = family_of(self.skeleton)
        self.num_blocks = len(_get(self.skeleton, self.family.blocks))
        self.num_layers = self.num_blocks + 2
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.std = float(getattr(self.config, "initializer_range", 0.02))
        self._lock = threading.Lock()  # ranks may be threads sharing this skeleton

    def __call__(self, i: int) -> nn.Module:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} outside [0, {self.num_layers})")
        fam, sk = self.family, self.skeleton
        with self._lock:
            if i == 0:
                pos = _materialise(_get(sk, fam.pos_embed)) if fam.pos_embed else None
                layer: nn.Module = HFEmbedding(_materialise(_get(sk, fam.embed)), pos)
            elif i == self.num_layers - 1:
                layer = HFHead(_materialise(_get(sk, fam.norm)), _materialise(_get(sk, fam.head)))
            else:
                j = i - 1
                rotary = type(_get(sk, fam.rotary))(config=self.config) if fam.rotary else None
                types = getattr(self.config, "layer_types", None)
                sliding = bool(types) and types[j] == "sliding_attention"
                layer = HFBlock(_materialise(_get(sk, fam.blocks)[j]), self.config, rotary,
                                sliding)
        seeded_hf_init_(layer, layer_seed(self.seed, i), self.std, fam.scaled,
                        gpt2_scaled_std(self.std, self.num_blocks) if fam.scaled else None)
        if i == 0 or (i == self.num_layers - 1 and self.tied):
            matrix = layer.tokens.weight if i == 0 else layer.lm_head.weight
            with torch.no_grad():  # one generator for the (possibly shared) matrix
                matrix.copy_(self._embedding(matrix.shape))
        return layer

    def _embedding(self, shape: torch.Size) -> torch.Tensor:
        matrix = shared_matrix(layer_seed(self.seed, 0) ^ 0x5EED, shape, self.std)
        pad = _get(self.skeleton, self.family.embed).padding_idx
        if pad is not None:
            matrix[pad] = 0.0
        return matrix


def adapted_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of `config` with dropout off (see the module docstring)."""
    config = copy.deepcopy(config)
    for name in DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def from_hf_config(config: PretrainedConfig, seq_len: int, seed: int = 0,
                   name: str | None = None) -> HFLayeredModel:
    """Wrap the causal LM `AutoModelForCausalLM.from_config(config)` as a `LayeredModel`.

    `seq_len`: the training sequence length (boundary activations are
    [microbatch, seq_len, hidden]); `seed`: the weight seed.
    """
    config = adapted_config(config)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise HFModelError(f"seq_len={seq_len} exceeds max_position_embeddings={max_pos}")
    build = _LayerBuilder(config, seed)
    hidden, n = build.config.hidden_size, build.num_layers
    tied = ((TiedGroup(TIED_NAME, ((0, EMBED_PARAM), (n - 1, HEAD_PARAM))),)
            if build.tied else ())
    return HFLayeredModel(
        name=name or f"hf-{build.config.model_type}-{build.num_blocks}x{hidden}",
        num_layers=n,
        build_layer=build,
        loss_fn=token_loss,
        activation_spec=lambda mb: TensorSpec((mb, seq_len, hidden)),
        tied=tied,
        hf_config=build.config,
    )


# ---- from layer state dicts back to Hugging Face names --------------------------------
def hf_key(family: Family, num_layers: int, layer: int, key: str) -> str:
    """The Hugging Face state-dict name of parameter `key` of layer `layer`."""
    if layer == 0:
        prefixes = {"tokens": family.embed, "positions": family.pos_embed}
    elif layer == num_layers - 1:
        prefixes = {"norm": family.norm, "lm_head": family.head}
    else:
        prefixes = {"block": f"{family.blocks}.{layer - 1}"}
    local, _, rest = key.partition(".")
    if prefixes.get(local) is None:
        raise HFModelError(f"layer {layer} has an unexpected parameter {key!r}")
    return f"{prefixes[local]}.{rest}"


def hf_state_dict(config: PretrainedConfig, layers: dict[int, dict[str, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    """One Hugging Face state dict from every layer's module state dict.

    A tied head is checked equal to the embedding and left out (HF re-ties it on load)."""
    skeleton = meta_skeleton(config)
    family = family_of(skeleton)
    n = len(_get(skeleton, family.blocks)) + 2
    if sorted(layers) != list(range(n)):
        raise HFModelError(f"expected layers 0..{n - 1}, got {sorted(layers)}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        emb, head = layers[0][EMBED_PARAM], layers[n - 1][HEAD_PARAM]
        if not torch.equal(emb, head):
            raise HFModelError("tied embeddings differ between layer 0 and the head "
                               f"(max diff {float((emb - head).abs().max()):.3e}): not exporting "
                               "a model that was silently untied")
    out = {}
    for i in range(n):
        for key, value in layers[i].items():
            if tied and i == n - 1 and key == HEAD_PARAM:
                continue
            out[hf_key(family, n, i, key)] = value
    expected = {k for k in skeleton.state_dict() if not (tied and k == f"{family.head}.weight")}
    if set(out) != expected:
        raise HFModelError(f"state dict does not match {type(skeleton).__name__}: "
                           f"missing {sorted(expected - set(out))}, "
                           f"unexpected {sorted(set(out) - expected)}")
    return out


def write_hf_config(run_dir: str | os.PathLike, model: HFLayeredModel) -> Path:
    """Record the model's HF config in the run directory (what `odyssey export` reads)."""
    if model.hf_config is None:
        raise HFModelError(f"{model.name} did not come through odyssey.hf")
    path = Path(run_dir) / contract.HF_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(model.hf_config.to_json_string(use_diff=False))
    os.replace(tmp, path)  # every rank may write it: same bytes, atomic
    return path


def read_hf_config(path: str | os.PathLike) -> PretrainedConfig:
    """The config `write_hf_config` wrote."""
    return AutoConfig.from_pretrained(str(path))

"""Hugging Face causal LMs as Odyssey models, and export back to `from_pretrained`.

Needs the optional extra: `pip install odyssey-train[hf]` (transformers, safetensors).
See docs/hf-models.md.
"""

from odyssey.hf.adapter import (
    FAMILIES,
    HFLayeredModel,
    HFModelError,
    from_hf_config,
    hf_state_dict,
    read_hf_config,
    write_hf_config,
)

__all__ = ["FAMILIES", "HFLayeredModel", "HFModelError", "from_hf_config", "hf_state_dict",
           "read_hf_config", "write_hf_config"]

"""Consolidate a run's per-layer checkpoint into one state dict (safetensors).

Reads `RUN_DIR/checkpoints/step_NNNNNNNN/layer_IIII.pt` (each layer's `model` state
dict; optimizer state is left behind) through `odyssey.checkpoint`, which verifies each
file against the step's manifest (a peer copy stands in for a damaged one). Writes
`OUT/model.safetensors`:

* for a run whose model came through `odyssey.hf` (`RUN_DIR/hf_config.json` exists):
  Hugging Face's parameter names plus `config.json`, a directory
  `AutoModelForCausalLM.from_pretrained(OUT)` loads as is;
* otherwise: names `layers.<i>.<name in layer i>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from odyssey import checkpoint as ckpt
from odyssey import contract
from odyssey.hf.adapter import hf_state_dict, read_hf_config


class ExportError(ValueError):
    """Nothing (or nothing complete) to export."""


@dataclass(frozen=True)
class Exported:
    """What `export_run` wrote."""

    step: int
    """The checkpoint's step (the state after that step's update)."""
    out: Path
    weights: Path
    hugging_face: bool
    """True: `out` is a `from_pretrained` directory."""
    num_tensors: int


def layer_weights(root: str | os.PathLike, step: int | None = None
                  ) -> tuple[int, dict[int, dict[str, torch.Tensor]]]:
    """(step, {layer: module state dict}) of checkpoint `step` (None: the newest one that
    verifies); every file is checked against the step's manifest as it is read."""
    root = Path(root)
    good = ckpt.verified_steps(root)
    if step is None:
        if not good:
            raise ExportError(f"no complete checkpoint under {root} (steps found: "
                              f"{ckpt.candidate_steps(root) or 'none'})")
        step = good[-1]
    elif step not in good:
        raise ExportError(f"no complete checkpoint of step {step} under {root} "
                          f"(complete: {good or 'none'})")
    n = int(ckpt.read_meta(root, step)["num_layers"])
    return step, {i: ckpt.load_layer(root, step, i)["model"] for i in range(n)}


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
               checkpoint_dir: str | os.PathLike | None = None) -> Exported:
    """Write checkpoint `step` (None: the latest complete one) of `run_dir` to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    root = Path(checkpoint_dir) if checkpoint_dir else run_dir / contract.CHECKPOINT_DIR
    step, layers = layer_weights(root, step)
    config_file = run_dir / contract.HF_CONFIG_FILE
    hf = config_file.exists()
    if hf:
        config = read_hf_config(config_file)
        state = hf_state_dict(config, layers)
    else:
        state = {f"layers.{i}.{k}": v for i, sd in layers.items() for k, v in sd.items()}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / contract.EXPORT_WEIGHTS_FILE
    # safetensors wants contiguous tensors that share no storage
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(weights),
              metadata={"format": "pt", "odyssey_step": str(step)})
    if hf:
        config.save_pretrained(out)
    return Exported(step, out, weights, hf, len(state))

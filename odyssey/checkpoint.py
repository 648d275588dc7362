"""Per-layer checkpoints, written in the background, loadable under any plan.

Layout: `DIR/step_00000042/layer_0003.pt` holds one layer's parameters and optimizer
state; `meta.json` holds the step, the sampler position and the plan that wrote it.
Each layer is written by one holder (the lowest worker id). A checkpoint counts only
when `meta.json` and every layer file exist, so a crash mid-write is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch

from odyssey import contract


def _step_dir(root: Path, step: int) -> Path:
    return root / contract.checkpoint_step_dir(step)


def _clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}.{threading.get_ident()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves this rank's share of a checkpoint in a background thread."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.root = Path(directory)
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_async(self, step: int, layer_states: dict[int, dict], meta: dict | None) -> None:
        """Snapshot `layer_states` now (copy), write them in the background.

        `meta` is given by the leader only; it is written after its own layers.
        """
        self.wait()
        snapshot = {i: _clone_state(s) for i, s in layer_states.items()}

        def write() -> None:
            try:
                d = _step_dir(self.root, step)
                d.mkdir(parents=True, exist_ok=True)
                for i, state in snapshot.items():
                    _atomic_save(state, d / contract.checkpoint_layer_file(i))
                if meta is not None:
                    tmp = d / (contract.CHECKPOINT_META + ".tmp")
                    tmp.write_text(json.dumps({**meta, "step": step}, indent=1))
                    os.replace(tmp, d / contract.CHECKPOINT_META)
                    self._prune(meta["num_layers"])
            except BaseException as e:  # surfaced by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name=f"ckpt-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Finish the write in flight; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint write failed: {err}") from err

    def _prune(self, num_layers: int) -> None:
        complete = complete_steps(self.root, num_layers)
        for step in complete[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(_step_dir(self.root, step), ignore_errors=True)


def complete_steps(root: str | os.PathLike, num_layers: int) -> list[int]:
    """Steps with a complete checkpoint under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = contract.CHECKPOINT_STEP_DIR.match(d.name)
        if not m or not (d / contract.CHECKPOINT_META).exists():
            continue
        if all((d / contract.checkpoint_layer_file(i)).exists() for i in range(num_layers)):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_step(root: str | os.PathLike, num_layers: int) -> int | None:
    steps = complete_steps(root, num_layers)
    return steps[-1] if steps else None


def read_meta(root: str | os.PathLike, step: int) -> dict:
    return json.loads((_step_dir(Path(root), step) / contract.CHECKPOINT_META).read_text())


def load_layer(root: str | os.PathLike, step: int, layer: int) -> dict:
    path = _step_dir(Path(root), step) / contract.checkpoint_layer_file(layer)
    return torch.load(path, map_location="cpu", weights_only=True)

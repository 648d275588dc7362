"""Reading checkpoints back, only when they verify: where files live (the checkpoint
root and the peer-copy directories beside it), checking a step against its manifest,
finding the newest step that verifies, loading a layer from a copy that verifies.
The layout and the rules are in odyssey/checkpoint.py and docs/checkpoints.md."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from odyssey import contract


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and why."""


def entry(data: bytes) -> dict:
    """What the manifest records of a file with contents `data`."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# ---- where files live ----------------------------------------------------------------
def peer_root(root: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` keeps the peer copies of checkpoint root `root`."""
    return Path(root).parent / contract.PEER_CHECKPOINT_DIR / contract.peer_checkpoint_dir(rank)


def roots(root: str | os.PathLike) -> list[Path]:
    """`root`, then every peer-copy directory beside it: where a file may be found."""
    root = Path(root)
    peers = root.parent / contract.PEER_CHECKPOINT_DIR
    return [root, *(sorted(p for p in peers.iterdir() if p.is_dir()) if peers.is_dir() else [])]


def step_dir(root: Path, step: int) -> Path:
    return root / contract.checkpoint_step_dir(step)


# ---- verifying and reading ---------------------------------------------------------------
_hashes: dict[tuple[str, int, int], str] = {}
"""(path, size, mtime_ns) -> sha256 of files already hashed by this process."""
_hash_lock = threading.Lock()


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with _hash_lock:
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def check_file(path: Path, expected: dict) -> str | None:
    """None if `path` matches its manifest entry `expected`, else what is wrong with it."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path}: {size} bytes, the manifest says {expected['size']} (truncated?)"
    if _sha256(path) != expected["sha256"]:
        return f"{path}: checksum mismatch (corrupt)"
    return None


@dataclass
class Verified:
    """A checkpoint every file of which verifies: where each file's good copy is."""

    step: int
    files: dict[str, Path]
    meta: dict


def _manifest(root: Path, step: int) -> tuple[dict | None, list[str]]:
    """The step's manifest from the first root where it parses; problems seen."""
    return read_manifest(roots(root), step)


def read_manifest(dirs: list[Path], step: int) -> tuple[dict | None, list[str]]:
    """The step's manifest from the first of `dirs` where it parses; problems seen."""
    problems = []
    for r in dirs:
        path = step_dir(r, step) / contract.CHECKPOINT_MANIFEST
        if not path.exists():
            continue
        try:
            manifest = json.loads(path.read_text())
            if manifest["step"] != step or not isinstance(manifest["files"], dict):
                raise ValueError("wrong step or no file list")
            return manifest, problems
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            problems.append(f"{path}: unreadable manifest ({e})")
    return None, problems or [f"{step_dir(dirs[0], step)}: no manifest (incomplete)"]


def verify(root: str | os.PathLike, step: int, num_layers: int | None = None
           ) -> tuple[Verified | None, list[str]]:
    """Check every file of the checkpoint of `step`; (the checkpoint, []) if complete,
    else (None, what is wrong: one line per bad file, naming it)."""
    root = Path(root)
    manifest, problems = _manifest(root, step)
    if manifest is None:
        return None, problems
    n = manifest.get("num_layers") if num_layers is None else num_layers
    wanted = [contract.checkpoint_layer_file(i) for i in range(n or 0)]
    missing = [f for f in wanted if f not in manifest["files"]]
    if missing or manifest.get("num_layers") != n:
        return None, [f"{step_dir(root, step)}: manifest is for "
                      f"{manifest.get('num_layers')} layers, not {n}"]
    found: dict[str, Path] = {}
    bad = []
    for name, want in sorted(manifest["files"].items()):
        tried = []
        for r in roots(root):
            path = step_dir(r, step) / name
            why = check_file(path, want)
            if why is None:
                found[name] = path
                break
            if r == root or path.exists():
                tried.append(why)
        else:
            bad.append("; ".join(tried))
    if bad:
        return None, bad
    try:
        meta = json.loads(found[contract.CHECKPOINT_META].read_text())
    except (KeyError, ValueError) as e:
        return None, [f"{step_dir(root, step) / contract.CHECKPOINT_META}: {e}"]
    return Verified(step, found, meta), []


def candidate_steps(root: str | os.PathLike) -> list[int]:
    """Steps with a checkpoint directory in any root (complete or not), ascending."""
    steps = set()
    for r in roots(root):
        for d in r.iterdir() if r.is_dir() else []:
            m = contract.CHECKPOINT_STEP_DIR.match(d.name)
            if m:
                steps.add(int(m.group(1)))
    return sorted(steps)


def find_latest(root: str | os.PathLike, num_layers: int
                ) -> tuple[Verified | None, list[tuple[int, list[str]]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with why."""
    skipped = []
    for step in reversed(candidate_steps(root)):
        good, problems = verify(root, step, num_layers)
        if good is not None:
            return good, skipped
        skipped.append((step, problems))
    return None, skipped


def verified_steps(root: str | os.PathLike, num_layers: int | None = None) -> list[int]:
    """Steps whose checkpoint verifies, ascending."""
    return [s for s in candidate_steps(root) if verify(root, s, num_layers)[0] is not None]


def complete_steps(root: str | os.PathLike, num_layers: int) -> list[int]:
    """Steps with a complete (verified) checkpoint under `root`, ascending."""
    return verified_steps(root, num_layers)


def latest_step(root: str | os.PathLike, num_layers: int) -> int | None:
    """The newest step whose checkpoint verifies, or None."""
    good, _ = find_latest(root, num_layers)
    return good.step if good is not None else None


def read_meta(root: str | os.PathLike, step: int) -> dict:
    """The meta of a checkpoint that verifies; CheckpointError names what does not."""
    good, problems = verify(root, step)
    if good is None:
        raise CheckpointError(f"checkpoint of step {step} does not verify: "
                              + "; ".join(problems))
    return good.meta


def load_layer(root: str | os.PathLike, step: int, layer: int) -> dict:
    """One layer's state from the first copy that verifies against the step's manifest."""
    root = Path(root)
    manifest, problems = _manifest(root, step)
    name = contract.checkpoint_layer_file(layer)
    if manifest is None or name not in manifest["files"]:
        raise CheckpointError(f"checkpoint of step {step} has no verified {name}: "
                              + "; ".join(problems or ["not in its manifest"]))
    expected = manifest["files"][name]
    tried = []
    for r in roots(root):
        path = step_dir(r, step) / name
        if not path.is_file():
            continue
        data = path.read_bytes()  # verify the very bytes that are loaded
        if entry(data) == expected:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tried.append(f"{path}: checksum mismatch")
    raise CheckpointError(f"no copy of {name} of step {step} verifies: "
                          + ("; ".join(tried) or "missing everywhere"))



"""Agreeing, at a (re)start, on the checkpoint to resume when its files are spread over
several nodes' disks, and bringing each rank the files it lacks.

Every rank publishes what its own disks hold (the checkpoint root, the peer-copy
directories beside it, its `--checkpoint.peer-dir`): per step, the files that verify
against that step's manifest. All ranks then pick the same step, the newest one whose
files every rank's disks *together* cover, so losing a node and its disk loses nothing
as long as each of its files has a copy elsewhere. Each rank needs the meta, the manifest
and its stage's layer files in its checkpoint root; a file it has on none of its own
disks comes from the lowest rank that has it, through the store (`store_blob`), and is
checked against the manifest before it is written. Loading then reads the root as usual.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from odyssey import contract
from odyssey.checkpoint import write_atomic
from odyssey.checkpoint_read import (
    Verified,
    candidate_steps,
    check_file,
    entry,
    read_manifest,
    roots,
    step_dir,
)
from odyssey.store_blob import get_blob, put_blob


def _good_bytes(dirs: list[Path], step: int, name: str, want: dict) -> bytes | None:
    """The bytes of `name` from the first of `dirs` where they match `want` (the very
    bytes checked are the ones sent or written)."""
    for d in dirs:
        path = step_dir(d, step) / name
        if path.is_file() and path.stat().st_size == want["size"]:
            data = path.read_bytes()
            if entry(data) == want:
                return data
    return None


def local_dirs(root: str | os.PathLike, extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Where this rank's disks may hold checkpoint files: the root, the peer-copy
    directories beside it, and `extra` (its own peer-copy directory)."""
    out = roots(root)
    return out + [Path(e) for e in extra if Path(e) not in out]


def inventory(dirs: list[Path], num_layers: int) -> dict[str, dict]:
    """{step: {"manifest": text or None, "files": [names whose bytes verify on these
    disks], "problems": [what is wrong here]}}."""
    steps = sorted({s for d in dirs for s in candidate_steps(d)})
    out = {}
    for step in steps:
        manifest, problems = read_manifest(dirs, step)
        if manifest is None:
            out[str(step)] = {"manifest": None, "files": [], "problems": problems}
            continue
        if manifest.get("num_layers") != num_layers:
            out[str(step)] = {"manifest": None, "files": [], "problems": [
                f"{step_dir(dirs[0], step)}: manifest is for {manifest.get('num_layers')} "
                f"layers, not {num_layers}"]}
            continue
        have = [n for n, want in sorted(manifest["files"].items())  # hashes are cached
                if any(check_file(step_dir(d, step) / n, want) is None for d in dirs)]
        out[str(step)] = {"manifest": json.dumps(manifest, indent=1), "files": have,
                          "problems": []}
    return out


def choose_step(inventories: dict[int, dict], num_layers: int
                ) -> tuple[int | None, list[tuple[int, list[str]]]]:
    """The newest step whose files the ranks' disks together cover (the same on every
    rank: a pure function of the inventories), and the newer ones skipped with why."""
    steps = sorted({int(s) for inv in inventories.values() for s in inv}, reverse=True)
    skipped = []
    for step in steps:
        seen = [inv[str(step)] for inv in inventories.values() if str(step) in inv]
        held = [h for h in seen if h["manifest"] is not None]
        if not held:
            skipped.append((step, sorted({p for h in seen for p in h["problems"]})))
            continue
        manifest = json.loads(held[0]["manifest"])
        have = {n for h in held for n in h["files"]}
        missing = sorted(set(manifest["files"]) - have)
        wanted = {contract.checkpoint_layer_file(i) for i in range(num_layers)}
        missing += sorted(wanted - set(manifest["files"]))
        if not missing:
            return step, skipped
        skipped.append((step, [f"step {step}: {n} verifies on no rank's disk" for n in missing]))
    return None, skipped


def gather(store: dist.Store, attempt: int, rank: int, needs: dict[int, list[int]],
           root: str | os.PathLike, num_layers: int, extra_dirs: Iterable[str] = (),
           timeout_s: float = 120.0) -> tuple[Verified | None, list[tuple[int, list[str]]]]:
    """Agree with every rank in `needs` (rank -> the layers it loads) on the step to
    resume and put what this rank needs of it in `root`; (the verified checkpoint there,
    the newer steps skipped with why). Collective: every rank in `needs` calls it."""
    root, ranks = Path(root), sorted(needs)
    dirs = local_dirs(root, extra_dirs)
    store.set(contract.checkpoint_inventory_key(attempt, rank),
              json.dumps(inventory(dirs, num_layers)))
    keys = [contract.checkpoint_inventory_key(attempt, r) for r in ranks]
    store.wait(keys, timedelta(seconds=timeout_s))
    invs = {r: json.loads(v) for r, v in zip(ranks, store.multi_get(keys))}
    step, skipped = choose_step(invs, num_layers)
    if step is None:
        return None, skipped
    key = str(step)
    manifest_text = next(inv[key]["manifest"] for inv in invs.values()
                         if inv.get(key, {}).get("manifest"))
    files = json.loads(manifest_text)["files"]

    def wanted(r: int) -> list[str]:
        return [contract.CHECKPOINT_META, *(contract.checkpoint_layer_file(i) for i in needs[r])]

    def has(r: int, name: str) -> bool:
        return key in invs[r] and name in invs[r][key]["files"]

    for r in ranks:  # send what others lack and this rank is the first to hold
        for name in wanted(r):
            if not has(r, name) and min(q for q in ranks if has(q, name)) == rank:
                put_blob(store, contract.checkpoint_fetch_key(attempt, step, name, r),
                         _good_bytes(dirs, step, name, files[name]))
    d = step_dir(root, step)
    for name in wanted(rank):
        here = d / name
        if here.is_file() and _good_bytes([root], step, name, files[name]) is not None:
            continue
        data = (_good_bytes(dirs, step, name, files[name]) if has(rank, name) else
                get_blob(store, contract.checkpoint_fetch_key(attempt, step, name, rank),
                         timeout_s))
        if data is None or entry(data) != files[name]:
            skipped.append((step, [f"{name} did not arrive intact from a peer"]))
            return None, skipped
        write_atomic(data, here)
    if read_manifest([root], step)[0] is None:
        write_atomic(manifest_text.encode(), d / contract.CHECKPOINT_MANIFEST)
    meta = json.loads((d / contract.CHECKPOINT_META).read_text())
    return Verified(step, {n: d / n for n in wanted(rank)}, meta), skipped

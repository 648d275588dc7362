"""Per-layer checkpoints that verify themselves, written in the background, loadable
under any plan.

Layout (docs/checkpoints.md), under the checkpoint root (RUN_DIR/checkpoints):
``step_00000042/layer_0003.pt`` holds one layer's parameters and optimizer state,
written by the layer's first holder; ``meta.json`` (the leader) holds the step, the
sampler position and the plan that wrote it; ``manifest.json`` holds the sha256 and size
of every other file of the step. The leader writes the manifest last (atomically, by
rename), once every writer has reported its files through the store, so a step is
complete only when its manifest parses and every file it lists verifies. A write that
is interrupted (a rank killed, the job stopped) leaves no manifest: never loaded.

With peer copies on, every layer file is also sent (through the store,
`odyssey/store_blob.py`) to one rank ``p`` that does not hold the layer, which writes it
into its own copies directory (``peer-checkpoints/rank{p}/`` beside the root, or
``--checkpoint.peer-dir`` on its node's disk) with the meta and manifest the leader
publishes: a layer whose file is gone or damaged in the root is read from a copy that
verifies against the manifest, and `odyssey/checkpoint_share.py` brings copies from
other nodes' disks at a restart.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from odyssey import contract
from odyssey.checkpoint_read import (
    CheckpointError,
    Verified,
    candidate_steps,
    complete_steps,
    entry,
    find_latest,
    latest_step,
    load_layer,
    peer_root,
    read_meta,
    roots,
    step_dir,
    verified_steps,
    verify,
)
from odyssey.store_blob import get_blob, put_blob

__all__ = ["CheckpointError", "Checkpointer", "Verified", "candidate_steps", "complete_steps",
           "find_latest", "latest_step", "load_layer", "peer_for", "peer_root", "read_meta",
           "roots", "verified_steps", "verify"]


# ---- writing ----------------------------------------------------------------------------
def _clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


def write_atomic(data: bytes, path: Path) -> None:
    """Write `data` to `path` so a reader sees the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unlink_manifest(d: Path) -> None:
    """Files of `d` are about to change: it is incomplete until a new manifest exists."""
    try:
        (d / contract.CHECKPOINT_MANIFEST).unlink()
    except FileNotFoundError:
        pass


@dataclass
class _Round:
    """One step's checkpoint as the leader assembles it."""

    step: int
    tag: int
    writers: list[int]
    meta: dict
    copies: list[int]
    """Ranks that keep peer copies of this step (the leader publishes meta and manifest
    for them through the store)."""
    entries: dict[str, dict] = field(default_factory=dict)


class _LocalStore:
    """The store of a checkpointer that is its job's only writer (tools, tests)."""

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self._values[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self._values for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self._values[k] for k in keys]

    def get(self, key: str) -> bytes:
        return self._values[key]

    def wait(self, keys: list[str], timeout) -> None:
        if not self.check(keys):
            time.sleep(min(0.01, timeout.total_seconds()))
            raise dist.DistStoreError(f"{keys} not set")

    def delete_key(self, key: str) -> bool:
        return self._values.pop(key, None) is not None


class Checkpointer:
    """Saves this rank's share of each checkpoint in a background thread; the leader
    completes a checkpoint (its manifest) once every writer has reported its files.

    Writers report through the store (key `contract.checkpoint_files_key`), from the
    thread that trains, in `poll()`, the next `save()`, or `flush()`."""

    def __init__(self, directory: str | os.PathLike, store=None, rank: int = 0, keep: int = 2,
                 timeout_s: float = 120.0, say=None, store_factory=None,
                 copies_dir: str | os.PathLike | None = None):
        """`store`: the job's (None: this process is the only writer); `store_factory`: a
        new client of it for the writing thread (peer copies travel through it);
        `copies_dir`: where this rank keeps the peer copies it receives (default
        ``peer-checkpoints/rank{rank}`` beside the root)."""
        self.root = Path(directory)
        self.store = store if store is not None else _LocalStore()
        self.store_factory = store_factory or (lambda: self.store)
        self._thread_store = None
        self.copies_dir = Path(copies_dir) if copies_dir else peer_root(self.root, rank)
        self._copies: dict[int, int] = {}  # step -> tag of received copies without manifest
        self._stop_receiving = threading.Event()
        self.rank = rank
        self.keep = keep
        self.timeout_s = timeout_s
        self.say = say or (lambda msg: None)
        self._thread: threading.Thread | None = None
        self._written: tuple[int, int, dict] | None = None  # (tag, step, entries) to report
        self._error: BaseException | None = None
        self._rounds: list[_Round] = []
        self.saved: int | None = None
        """The step of the newest save() (its files may still be being written)."""
        self.last_complete: int | None = None
        """The newest step this leader completed (wrote the manifest of)."""

    def save(self, step: int, tag: int, layer_states: dict[int, dict], *,
             writers: list[int], meta: dict | None = None,
             peers: dict[int, int] | None = None, receive: Iterable[int] = ()) -> None:
        """Snapshot `layer_states` now (copy) and write them in the background.

        `tag` (the generation) keeps this round's store keys apart from another round of
        the same step. `meta` is given by the leader only: it then completes the step
        once every rank in `writers` reported. `peers`: layer -> the rank that keeps a
        copy of that layer's file (sent to it); `receive`: the layers this rank keeps
        copies of (their writers send them)."""
        self._stop_receiving.set()  # copies still awaited from a writer that is gone
        self._finish_write()
        self._stop_receiving.clear()
        self.saved = step
        peers, receive = dict(peers or {}), sorted(receive)
        if receive:
            self._copies[step] = tag
        snapshot = {i: _clone_state(s) for i, s in layer_states.items()}
        if meta is not None:
            copies = sorted(set(meta.get("peer_copies", {}).values()))
            self._rounds.append(_Round(step, tag, sorted(writers), {**meta, "step": step},
                                       copies))

        def write() -> None:
            try:
                entries = {}
                for i, state in snapshot.items():
                    buf = io.BytesIO()
                    torch.save(state, buf)
                    data = buf.getvalue()
                    name = contract.checkpoint_layer_file(i)
                    d = step_dir(self.root, step)
                    _unlink_manifest(d)
                    write_atomic(data, d / name)
                    entries[name] = entry(data)
                    if i in peers:
                        put_blob(self._store(), contract.checkpoint_copy_key(tag, step, i), data)
                self._written = (tag, step, entries)
                self._receive(tag, step, receive)
            except BaseException as e:  # surfaced by _finish_write()
                self._error = e

        self._thread = threading.Thread(target=write, name=f"ckpt-{step}", daemon=True)
        self._thread.start()

    def _store(self):
        """The writing thread's own store client (a client is not shared across threads)."""
        if self._thread_store is None:
            self._thread_store = self.store_factory()
        return self._thread_store

    def _receive(self, tag: int, step: int, layers: list[int]) -> None:
        """Write the peer copies this rank keeps of `step`, as their writers send them."""
        for i in layers:
            name = contract.checkpoint_layer_file(i)
            data = get_blob(self._store(), contract.checkpoint_copy_key(tag, step, i),
                            self.timeout_s, self._stop_receiving.is_set)
            if data is None:
                self.say(f"no peer copy of {name} of step {step}: its writer did not send "
                         f"it within {self.timeout_s:g}s")
                continue
            d = step_dir(self.copies_dir, step)
            _unlink_manifest(d)
            write_atomic(data, d / name)

    def poll(self) -> None:
        """Report a finished write; the leader completes every round now reported; a
        copy holder writes the manifests the leader published."""
        self._report()  # before the thread ends: it may still be receiving copies
        if self._thread is not None and not self._thread.is_alive():
            self._finish_write()
        self._complete_rounds(block=False)
        self._complete_copies(block=False)

    def flush(self) -> int | None:
        """Finish the write in flight and (leader) complete every round, waiting up to
        `timeout_s` for the other writers; the newest step completed here, if any."""
        self._finish_write()
        done = self._complete_rounds(block=True)
        self._complete_copies(block=True)
        return done

    def _complete_copies(self, block: bool) -> None:
        """Put meta and manifest beside the copies of each step whose write finished
        (they make the copies directory a checkpoint that verifies on its own)."""
        deadline = time.monotonic() + self.timeout_s
        for step, tag in sorted(self._copies.items()):
            if self._thread is not None and self.saved == step:
                continue  # still receiving
            key = contract.checkpoint_manifest_key(tag, step)
            while block and not self.store.check([key]) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.store.check([key]):
                continue
            files = json.loads(self.store.get(key))
            del self._copies[step]
            if not files.get("abandoned"):
                d = step_dir(self.copies_dir, step)
                write_atomic(files["meta"].encode(), d / contract.CHECKPOINT_META)
                write_atomic(files["manifest"].encode(), d / contract.CHECKPOINT_MANIFEST)
        if block:
            self._copies.clear()  # the leader is gone: those copies stay incomplete

    def _finish_write(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint write failed: {err}") from err
        self._report()

    def _report(self) -> None:
        """Tell the leader this rank's files of the last save are written."""
        if self._written is not None:
            tag, step, entries = self._written
            self._written = None
            self.store.set(contract.checkpoint_files_key(tag, step, self.rank),
                           json.dumps(entries))

    def _complete_rounds(self, block: bool) -> int | None:
        """Write the manifest of each round all of whose writers reported; the newest
        step completed, if any. `block`: wait up to `timeout_s` for the newest round.

        A writer reports round k before it starts writing round k+1, so once a newer
        round is complete, an older one still missing a report never gets it (its writer
        is gone): it is dropped, and stays an incomplete directory."""
        deadline = time.monotonic() + self.timeout_s
        for idx in range(len(self._rounds) - 1, -1, -1):
            rnd = self._rounds[idx]
            while block and not self._reported(rnd) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._reported(rnd):
                for older in self._rounds[:idx]:
                    if self._reported(older):
                        self._write_manifest(older)
                    else:
                        self.say(f"checkpoint of step {older.step} left incomplete: a "
                                 f"writer never reported; superseded by step {rnd.step}")
                self._write_manifest(rnd)
                self._rounds = self._rounds[idx + 1:]
                self.last_complete = rnd.step
                self._prune()
                return rnd.step
            if block:
                self.say(f"checkpoint of step {rnd.step} abandoned: not every writer of "
                         f"{rnd.writers} reported its files within {self.timeout_s:g}s")
                self._publish(rnd, {"abandoned": True})
                block = False  # older rounds: only if already reported
        return None

    def _reported(self, rnd: _Round) -> bool:
        keys = [contract.checkpoint_files_key(rnd.tag, rnd.step, w) for w in rnd.writers]
        if not self.store.check(keys):
            return False
        if not rnd.entries:
            for raw in self.store.multi_get(keys):
                rnd.entries.update(json.loads(raw))
        return True

    def _write_manifest(self, rnd: _Round) -> None:
        meta = json.dumps(rnd.meta, indent=1).encode()
        files = {**rnd.entries, contract.CHECKPOINT_META: entry(meta)}
        manifest = json.dumps({"step": rnd.step, "num_layers": rnd.meta["num_layers"],
                               "files": files}, indent=1).encode()
        d = step_dir(self.root, rnd.step)
        write_atomic(meta, d / contract.CHECKPOINT_META)
        write_atomic(manifest, d / contract.CHECKPOINT_MANIFEST)  # last: completes it
        self._publish(rnd, {"meta": meta.decode(), "manifest": manifest.decode()})

    def _publish(self, rnd: _Round, files: dict) -> None:
        if rnd.copies:  # for the ranks that keep copies of this step
            self.store.set(contract.checkpoint_manifest_key(rnd.tag, rnd.step),
                           json.dumps(files))

    def _prune(self) -> None:
        """Keep the `keep` newest complete checkpoints; drop every older step directory
        (complete or not) in every root. Newer incomplete ones may be in flight: kept."""
        if self.keep <= 0:
            return
        complete = verified_steps(self.root)
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        for r in roots(self.root):
            for d in r.iterdir() if r.is_dir() else []:
                m = contract.CHECKPOINT_STEP_DIR.match(d.name)
                if m and int(m.group(1)) < oldest_kept:
                    shutil.rmtree(d, ignore_errors=True)


def peer_for(layer_holders: Iterable[int], writer: int, ranks: list[int],
             node_size: int = 0) -> int | None:
    """The rank that keeps the peer copy of a layer: the first rank after `writer`
    (cyclically) on another node (ranks r // node_size; 0: unknown) that does not hold
    it; else the first one anywhere that does not hold it; else any other rank; None when
    alone."""
    holders = set(layer_holders)
    order = sorted(ranks)
    start = order.index(writer) if writer in order else 0
    after = order[start + 1:] + order[:start]
    node = (lambda r: r // node_size) if node_size > 0 else (lambda r: r)
    for r in after:
        if r not in holders and node(r) != node(writer):
            return r
    for r in after:
        if r not in holders:
            return r
    return after[0] if after else None

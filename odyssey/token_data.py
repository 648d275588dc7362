"""Token files as datasets keyed by sample id (the nanoGPT / Megatron layout).

A token file is a flat array of little-endian `uint16` (or `uint32`) token ids, read
through `np.memmap`; `odyssey prepare-data` writes one from a text corpus, with a small
JSON sidecar (`FILE.json`: dtype, vocab size, tokenizer). Sample `s` is a window of
`seq_len + 1` tokens (inputs and targets shifted by one); windows start every `seq_len`
tokens. Each epoch visits every window once, in an order shuffled by (seed, epoch):

    sample id s -> (epoch, position) = divmod(s, num_windows) -> window = order[epoch][position]

so the samples of step k stay a pure function of k under any plan, recovery or resume.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
"""Token id types a token file may hold."""
SIDECAR_SUFFIX = ".json"
"""`FILE.json` describes token file FILE (written by `odyssey prepare-data`)."""


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: str | Path) -> dict:
    """The token file's description ({} when it has none, e.g. a nanoGPT .bin file)."""
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.exists() else {}


def open_tokens(path: str | Path, dtype: str = "auto") -> np.ndarray:
    """Memory-map a token file; `dtype` auto reads the sidecar (default uint16)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist (write one with "
                                f"`odyssey prepare-data CORPUS --out {path}`)")
    if dtype == "auto":
        dtype = read_sidecar(path).get("dtype", "uint16")
    if dtype not in DTYPES:
        raise ValueError(f"token dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a whole number of "
                         f"{dtype} tokens (wrong dtype?)")
    return np.memmap(path, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"), mode="r")


class TokenWindows:
    """Windows of `seq_len + 1` tokens served by sample id; see the module docstring.

    `batch(sample_ids) -> (inputs, targets)`, both int64 [len(ids), seq_len]: the data
    contract of `odyssey.engine`. Thread-safe (a background loader calls it)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True,
                 name: str = "tokens"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{name}: {len(tokens)} tokens hold no window of "
                             f"seq_len + 1 = {seq_len + 1} tokens")
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window order of `epoch`: a permutation keyed by (seed, epoch) alone."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
                if len(self._orders) >= 2:  # a step spans at most two epochs
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = order
            return order

    def window(self, sample_id: int) -> int:
        """Index of the window sample `sample_id` reads."""
        if sample_id < 0:
            raise ValueError(f"sample id {sample_id} is negative")
        epoch, position = divmod(sample_id, self.num_windows)
        return int(self.epoch_order(epoch)[position]) if self.shuffle else position

    def epoch(self, sample_id: int) -> int:
        return sample_id // self.num_windows

    def batch(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.seq_len + 1
        rows = np.empty((len(sample_ids), n), dtype=np.int64)
        for row, s in enumerate(sample_ids):
            start = self.window(s) * self.seq_len
            rows[row] = self.tokens[start:start + n]
        seq = torch.from_numpy(rows)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


@dataclass
class TokenData:
    """A training split and a validation split of token files, and their vocabulary."""

    train: TokenWindows
    val: TokenWindows | None
    vocab_size: int | None
    """From the sidecar (None when unknown: the model must then be told)."""
    info: dict
    """The training file's sidecar."""


def open_token_data(path: str | Path, seq_len: int, *, dtype: str = "auto",
                    val_path: str | Path = "", val_fraction: float = 0.05, seed: int = 0,
                    shuffle: bool = True) -> TokenData:
    """Training windows from `path`; validation windows from `val_path`, else from the last
    `val_fraction` of `path`'s tokens (held out: training never reads them). Validation
    windows are shuffled with their own seed, so the first N ids are a fixed random subset.
    """
    tokens = open_tokens(path, dtype)
    info = read_sidecar(path)
    if val_path:
        train_tokens, val_tokens = tokens, open_tokens(val_path, dtype)
    elif val_fraction > 0:
        cut = len(tokens) - int(round(len(tokens) * val_fraction))
        train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    else:
        train_tokens, val_tokens = tokens, None
    train = TokenWindows(train_tokens, seq_len, seed, shuffle, name=f"{path} (train)")
    val = (TokenWindows(val_tokens, seq_len, seed + 1, True, name=f"{val_path or path} (val)")
           if val_tokens is not None else None)
    return TokenData(train, val, info.get("vocab_size"), info)

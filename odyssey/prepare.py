"""Turn a text corpus into a token file (odyssey prepare-data).

    odyssey prepare-data --stdlib --out data/stdlib.bin            # Python's own sources
    odyssey prepare-data docs/ README.md --out data/docs.bin --glob '*.md'
    odyssey prepare-data corpus/ --out data/c.bin --tokenizer bpe --vocab-size 4096

Files are read in sorted path order (the same corpus gives the same file), joined with a
newline, and tokenized byte by byte (vocab 256, uint16) or with a byte-level BPE trained
here on the corpus itself (`--tokenizer bpe`, needs the `tokenizers` package: the `data`
extra; nothing is downloaded). Writes FILE (flat little-endian token ids), FILE.json
(dtype, vocab size, tokenizer, token count, sources) and, for BPE, FILE.tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from odyssey.token_data import DTYPES, sidecar_path

TOKENIZERS = ("byte", "bpe")
STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
"""Folders of the standard library left out of --stdlib (tests, installed packages)."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(sources: list[Path], pattern: str) -> list[Path]:
    """Every file under `sources` (directories searched for `pattern`), sorted."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files.extend(p for p in src.rglob(pattern)
                         if p.is_file() and not STDLIB_SKIP & set(p.relative_to(src).parts))
        elif src.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"corpus source {src} does not exist")
    return sorted(set(files))


def read_corpus(files: list[Path], max_bytes: int) -> Iterator[bytes]:
    """File contents, newline-terminated, stopping before `max_bytes` (0: no cap)."""
    total = 0
    for path in files:
        text = path.read_bytes()
        if not text.endswith(b"\n"):
            text += b"\n"
        if max_bytes and total + len(text) > max_bytes:
            return
        total += len(text)
        yield text


def byte_tokens(chunks: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.uint16)


def bpe_tokens(chunks: list[bytes], vocab_size: int, out: Path) -> tuple[np.ndarray, int]:
    """Train a byte-level BPE on the corpus, save it beside `out`, encode the corpus."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:  # optional extra
        raise SystemExit(f"--tokenizer bpe needs the tokenizers package ({e}): "
                         "pip install 'odyssey-train[data]'") from e
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [c.decode("utf-8", errors="replace") for c in chunks]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out.with_name(out.name + ".tokenizer.json")))
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    n = tok.get_vocab_size()
    dtype = DTYPES["uint16"] if n <= 2**16 else DTYPES["uint32"]
    return np.asarray(ids, dtype=dtype), n


def prepare(sources: list[Path], out: Path, *, tokenizer: str = "byte",
            vocab_size: int = 4096, pattern: str = "*.py", max_bytes: int = 0) -> dict:
    """Write the token file `out` and its sidecar; return the sidecar's content."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    files = corpus_files(sources, pattern)
    chunks = list(read_corpus(files, max_bytes))
    if not chunks:
        raise ValueError(f"no text found in {[str(s) for s in sources]} (pattern {pattern!r},"
                         f" cap {max_bytes} bytes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer == "byte":
        ids, vocab = byte_tokens(chunks), 256
    else:
        ids, vocab = bpe_tokens(chunks, vocab_size, out)
    dtype = "uint16" if ids.dtype == np.uint16 else "uint32"
    tmp = out.with_name(out.name + ".tmp")
    ids.astype(ids.dtype.newbyteorder("<")).tofile(tmp)
    tmp.replace(out)
    info = {"dtype": dtype, "vocab_size": vocab, "tokenizer": tokenizer,
            "num_tokens": int(len(ids)), "num_bytes": sum(map(len, chunks)),
            "num_files": len(chunks), "sources": [str(s) for s in sources],
            "pattern": pattern}
    sidecar_path(out).write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="odyssey prepare-data",
        description="Tokenize a text corpus into a token file for --data.path (flat "
                    "little-endian uint16/uint32 ids, nanoGPT/Megatron layout).")
    p.add_argument("sources", nargs="*", type=Path, help="files or directories of text")
    p.add_argument("--stdlib", action="store_true",
                   help=f"add this interpreter's standard-library sources ({stdlib_root()}, "
                        "tests and site-packages left out)")
    p.add_argument("--out", type=Path, required=True, help="token file to write")
    p.add_argument("--glob", default="*.py", help="files to take from directories")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="byte",
                   help="byte: one token per byte (vocab 256); bpe: byte-level BPE "
                        "trained on this corpus (needs `tokenizers`)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--max-mb", type=float, default=0.0,
                   help="stop adding files at this many MB of text (0: no cap)")
    args = p.parse_args(argv)
    sources = [*args.sources, *([stdlib_root()] if args.stdlib else [])]
    if not sources:
        p.error("give corpus files/directories or --stdlib")
    info = prepare(sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   pattern=args.glob, max_bytes=int(args.max_mb * 1e6))
    print(f"wrote {args.out}: {info['num_tokens']:,} {info['dtype']} tokens (vocab "
          f"{info['vocab_size']}, {info['tokenizer']}) from {info['num_files']} files, "
          f"{info['num_bytes'] / 1e6:.1f} MB of text")
    return 0

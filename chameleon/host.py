"""Host tiers for swapped tensors: one arena allocator over byte segments.

Segments are pinned RAM (CUDA), plain RAM, or a memory-mapped file (disk tier). The
arena is pre-sized and grows by whole segments; blocks are 4 KiB aligned so the disk
tier can drop a block's pages from the process (madvise MADV_DONTNEED on a shared file
mapping keeps the data in the file / page cache but removes it from RSS).
"""

from __future__ import annotations

import bisect
import mmap
import os
import tempfile
import warnings

import torch

ALIGN = 4096


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class Segment:
    """A contiguous host buffer exposed as a 1-D uint8 tensor."""

    def __init__(self, nbytes: int, kind: str, disk_dir: str | None = None) -> None:
        self.nbytes, self.kind = nbytes, kind
        self._mm: mmap.mmap | None = None
        if kind == "disk":
            fd, path = tempfile.mkstemp(prefix="chameleon-", suffix=".swap", dir=disk_dir)
            try:
                os.unlink(path)  # space is returned when the mapping dies
                os.ftruncate(fd, nbytes)
                self._mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))

    def release_pages(self, offset: int, nbytes: int) -> None:
        """Disk tier: drop the block's pages from this process's resident set."""
        if self._mm is not None and nbytes > 0:
            self._mm.madvise(mmap.MADV_DONTNEED, offset, _round_up(nbytes))


class Block:
    """One allocation: `tensor` is a uint8 view of `nbytes` bytes inside a segment."""

    __slots__ = ("seg", "offset", "size", "nbytes", "tensor")

    def __init__(self, seg: Segment, offset: int, size: int, nbytes: int) -> None:
        self.seg, self.offset, self.size, self.nbytes = seg, offset, size, nbytes
        self.tensor = seg.tensor[offset:offset + nbytes]

    def release_pages(self) -> None:
        self.seg.release_pages(self.offset, self.size)


class HostArena:
    """First-fit allocator with coalescing over growable segments of one tier."""

    def __init__(self, tier: str, initial_bytes: int = 0, disk_dir: str | None = None) -> None:
        if tier not in ("cpu", "pinned", "disk"):
            raise ValueError(f"unknown host tier {tier!r}; use cpu, pinned or disk")
        if tier == "pinned" and not torch.cuda.is_available():
            warnings.warn("pinned host tier needs CUDA; using plain cpu memory", stacklevel=2)
            tier = "cpu"
        self.tier, self.disk_dir = tier, disk_dir
        self.segments: list[Segment] = []
        self._free: list[list[tuple[int, int]]] = []  # per segment: sorted (offset, size)
        self.used = self.peak_used = 0
        if initial_bytes > 0:
            self._grow(initial_bytes)

    @property
    def capacity(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def reserve(self, nbytes: int) -> None:
        """Make sure at least `nbytes` could be allocated without growing later."""
        free = sum(size for fl in self._free for _, size in fl)
        if free < nbytes:
            self._grow(nbytes - free)

    def _grow(self, nbytes: int) -> None:
        size = _round_up(max(nbytes, 16 * ALIGN, self.capacity // 2))
        self.segments.append(Segment(size, self.tier, self.disk_dir))
        self._free.append([(0, size)])

    def alloc(self, nbytes: int) -> Block:
        size = _round_up(max(nbytes, 1))
        for si, fl in enumerate(self._free):
            for j, (off, sz) in enumerate(fl):
                if sz >= size:
                    if sz == size:
                        fl.pop(j)
                    else:
                        fl[j] = (off + size, sz - size)
                    return self._take(si, off, size, nbytes)
        self._grow(size)
        si = len(self.segments) - 1
        off, sz = self._free[si][0]
        self._free[si][0] = (off + size, sz - size)
        if sz == size:
            self._free[si].pop(0)
        return self._take(si, off, size, nbytes)

    def _take(self, si: int, off: int, size: int, nbytes: int) -> Block:
        self.used += size
        self.peak_used = max(self.peak_used, self.used)
        return Block(self.segments[si], off, size, nbytes)

    def free(self, block: Block) -> None:
        si = next(i for i, s in enumerate(self.segments) if s is block.seg)
        fl = self._free[si]
        off, size = block.offset, block.size
        i = bisect.bisect_left(fl, (off, 0))
        if i < len(fl) and fl[i][0] == off + size:  # merge with next
            size += fl[i][1]
            fl.pop(i)
        if i > 0 and fl[i - 1][0] + fl[i - 1][1] == off:  # merge with previous
            off, size = fl[i - 1][0], fl[i - 1][1] + size
            fl.pop(i - 1)
            i -= 1
        fl.insert(i, (off, size))
        self.used -= block.size
        block.tensor = None  # type: ignore[assignment]

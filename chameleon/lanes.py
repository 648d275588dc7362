"""Copy engines: two lanes (device->host "out", host->device "in") plus bandwidth meter.

* `CudaLanes`: one CUDA stream per direction; ordering through events (never
  record_stream, never a device-wide sync). The compute stream waits on the copy's
  event before using a fetched tensor; the host only blocks when the budget forces it.
* `ThreadLanes`: one worker thread per direction (CPU training, e.g. the disk tier):
  torch copies release the GIL, so copies overlap compute on a second core.
* `SyncLanes`: copy inline (simplest; the copy time is a stall).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from chameleon.host import Block


class Ticket:
    """A copy in flight. `done()` never blocks; `wait()` blocks the host."""

    direction = ""
    nbytes = 0

    def done(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        raise NotImplementedError

    def seconds(self) -> float | None:
        """Measured copy duration once done (None if unknown)."""
        return None


class _DoneTicket(Ticket):
    def __init__(self, direction: str, nbytes: int, seconds: float) -> None:
        self.direction, self.nbytes, self._s = direction, nbytes, seconds

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def seconds(self) -> float | None:
        return self._s


class _FutureTicket(Ticket):
    def __init__(self, direction: str, nbytes: int, fut: Future) -> None:
        self.direction, self.nbytes, self.fut = direction, nbytes, fut

    def done(self) -> bool:
        return self.fut.done()

    def wait(self) -> None:
        self.fut.result()

    def seconds(self) -> float | None:
        return self.fut.result() if self.fut.done() else None


class _CudaTicket(Ticket):
    def __init__(self, direction: str, nbytes: int, start: torch.cuda.Event,
                 end: torch.cuda.Event) -> None:
        self.direction, self.nbytes, self.start, self.end = direction, nbytes, start, end

    def done(self) -> bool:
        return self.end.query()

    def wait(self) -> None:
        self.end.synchronize()

    def seconds(self) -> float | None:
        return self.start.elapsed_time(self.end) / 1e3 if self.end.query() else None


class BandwidthMeter:
    """Online estimate of copy bandwidth per direction (EWMA over completed copies)."""

    def __init__(self, alpha: float = 0.2, min_bytes: int = 256 * 1024) -> None:
        self.alpha, self.min_bytes = alpha, min_bytes
        self.Bps: dict[str, float] = {}
        self.samples: dict[str, int] = {"out": 0, "in": 0}

    def observe(self, ticket: Ticket) -> None:
        s = ticket.seconds()
        if s is None or s <= 0 or ticket.nbytes < self.min_bytes:
            return
        bw = ticket.nbytes / s
        old = self.Bps.get(ticket.direction)
        self.Bps[ticket.direction] = bw if old is None else (1 - self.alpha) * old + self.alpha * bw
        self.samples[ticket.direction] = self.samples.get(ticket.direction, 0) + 1

    def get(self, direction: str, default: float = 1e9) -> float:
        return self.Bps.get(direction, default)


class CopyLanes:
    """Base: subclasses implement `out` (swap-out) and `inn` (fetch)."""

    kind = ""

    def out(self, src: torch.Tensor, blk: Block) -> Ticket:
        """Copy device bytes `src` (uint8) into host block `blk`."""
        raise NotImplementedError

    def inn(self, blk: Block, dst: torch.Tensor, after: Ticket | None) -> Ticket:
        """Copy host block into device bytes `dst` once `after` (its swap-out) is done."""
        raise NotImplementedError

    def device_wait(self, t: Ticket) -> None:
        """Order the current compute stream after `t` (host wait where no streams)."""
        t.wait()

    def close(self) -> None:
        return None


CHUNK = 2 * 1024 * 1024
"""Disk-tier copies go in chunks, each chunk's pages dropped right after, so the copy
itself never maps more than one chunk of file pages into the process."""


def _copy_out(src: torch.Tensor, blk: Block) -> float:
    t0 = time.perf_counter()
    if blk.seg.kind != "disk":
        blk.tensor.copy_(src)
    else:
        for off in range(0, blk.nbytes, CHUNK):
            n = min(CHUNK, blk.nbytes - off)
            blk.tensor[off:off + n].copy_(src[off:off + n])
            blk.seg.release_pages(blk.offset + off, n)
    return time.perf_counter() - t0


def _copy_in(blk: Block, dst: torch.Tensor, after: Ticket | None) -> float:
    if after is not None:
        after.wait()
    t0 = time.perf_counter()
    if blk.seg.kind != "disk":
        dst.copy_(blk.tensor)
    else:
        for off in range(0, blk.nbytes, CHUNK):
            n = min(CHUNK, blk.nbytes - off)
            dst[off:off + n].copy_(blk.tensor[off:off + n])
            blk.seg.release_pages(blk.offset + off, n)
    return time.perf_counter() - t0


class SyncLanes(CopyLanes):
    kind = "sync"

    def out(self, src: torch.Tensor, blk: Block) -> Ticket:
        return _DoneTicket("out", blk.nbytes, _copy_out(src, blk))

    def inn(self, blk: Block, dst: torch.Tensor, after: Ticket | None) -> Ticket:
        return _DoneTicket("in", blk.nbytes, _copy_in(blk, dst, after))


class ThreadLanes(CopyLanes):
    kind = "thread"

    def __init__(self) -> None:
        self._out = ThreadPoolExecutor(1, thread_name_prefix="chameleon-d2h")
        self._in = ThreadPoolExecutor(1, thread_name_prefix="chameleon-h2d")

    def out(self, src: torch.Tensor, blk: Block) -> Ticket:
        return _FutureTicket("out", blk.nbytes, self._out.submit(_copy_out, src, blk))

    def inn(self, blk: Block, dst: torch.Tensor, after: Ticket | None) -> Ticket:
        return _FutureTicket("in", blk.nbytes, self._in.submit(_copy_in, blk, dst, after))

    def close(self) -> None:
        self._out.shutdown(wait=True)
        self._in.shutdown(wait=True)


class CudaLanes(CopyLanes):  # pragma: no cover - needs a GPU
    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._out = torch.cuda.Stream(device)
        self._in = torch.cuda.Stream(device)

    def _copy(self, stream: torch.cuda.Stream, direction: str, dst: torch.Tensor,
              src: torch.Tensor, nbytes: int, after: Ticket | None) -> Ticket:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            if isinstance(after, _CudaTicket):
                stream.wait_event(after.end)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
        return _CudaTicket(direction, nbytes, start, end)

    def out(self, src: torch.Tensor, blk: Block) -> Ticket:
        t = self._copy(self._out, "out", blk.tensor, src, blk.nbytes, None)
        if blk.seg.kind == "disk":  # pageable mmap: finish, then drop its pages
            t.wait()
            blk.release_pages()
        return t

    def inn(self, blk: Block, dst: torch.Tensor, after: Ticket | None) -> Ticket:
        return self._copy(self._in, "in", dst, blk.tensor, blk.nbytes, after)

    def device_wait(self, t: Ticket) -> None:
        if isinstance(t, _CudaTicket):
            torch.cuda.current_stream(self.device).wait_event(t.end)
        else:
            t.wait()


def make_lanes(kind: str, device: torch.device) -> CopyLanes:
    """"auto": CUDA streams on a CUDA device, a worker thread per direction on CPU."""
    if kind == "auto":
        kind = "cuda" if device.type == "cuda" else "thread"
    if kind == "cuda":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("lanes='cuda' needs a CUDA device")
        return CudaLanes(device)
    if kind == "thread":
        return ThreadLanes()
    if kind == "sync":
        return SyncLanes()
    raise ValueError(f"unknown lanes {kind!r}; use auto, cuda, thread or sync")

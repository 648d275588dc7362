"""The background half of a two-phase transition (`planner.recovery.two_phase`).

While the rerouted plan trains, each transfer of the plan to switch to runs on a channel
of its own (kind "bg", one per sender and receiver, built by the copy's own threads so
the survivors resume without waiting for it): the sender packs the layers' state
as committed when the phase began and streams it, at `RecoveryConfig.background_Bps` if
set; after each committed step it sends those layers' final gradients (reduced, unscaled
and clipped: what its optimizer applies), and the receiver applies them to its copy with
the same optimizer and learning rate. At the switch the copies equal their sources bit
for bit (the transition's replica check proves it) and nothing needs to move.

A failure before the switch abandons the copies: the next recovery plans from the
rerouted plan's own state, as if no copy had started.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from odyssey import contract
from odyssey.comm import Comm, CommConfig, CommError, Pending, StepAborted
from odyssey.held_layers import HeldLayers
from planner.placement import Transfer
from planner.program import Channel

KIND = "bg"
"""The channel kind of background copies."""
_END = -1.0  # header step of the last message on a channel (the switch)
_CHUNK_S = 0.05  # a rate-limited copy sends pieces of this many seconds' worth


class BackgroundCopy:
    """This rank's side of the background copies of one two-phase generation."""

    def __init__(self, comm_cfg: CommConfig, rank: int, transfers: list[Transfer],
                 held: HeldLayers, wire: torch.device, lr_at: Callable[[int], float],
                 rate_Bps: float, first_step: int, store, generation: int):
        self.comm_cfg, self.rank, self.held, self.wire = comm_cfg, rank, held, wire
        self.lr_at, self.rate_Bps = lr_at, rate_Bps
        self.store, self.generation = store, generation
        self.transfers = transfers
        self.shadow = held.sibling()  # the layers coming in, stepped by the receivers
        self._stop = threading.Event()
        self._error: list[str] = []
        self.started = time.time()
        self.copied_at: float | None = None  # when every incoming layer's state was in
        out: dict[int, list[int]] = {}
        inc: dict[int, list[int]] = {}
        for t in transfers:
            if t.src == rank:
                out.setdefault(t.dst, []).append(t.layer)
            if t.dst == rank:
                inc.setdefault(t.src, []).append(t.layer)
        # senders snapshot the state every holder committed, before it changes
        self._senders = [_Sender(self, dst, sorted(ls)) for dst, ls in sorted(out.items())]
        self._receivers = [_Receiver(self, src, sorted(ls), first_step)
                           for src, ls in sorted(inc.items())]
        self._waiting = len(self._receivers)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=w.run, daemon=True, name=f"odyssey-bg-{w}")
                         for w in (*self._senders, *self._receivers)]
        for t in self._threads:
            t.start()
        if not self._receivers:
            self.copied_at = self.started

    # ---- what the coordinator asks --------------------------------------------------
    @property
    def incoming(self) -> dict[int, frozenset[int]]:
        """Every receiving rank -> the layers it gets (the same on every member)."""
        out: dict[int, set[int]] = {}
        for t in self.transfers:
            out.setdefault(t.dst, set()).add(t.layer)
        return {r: frozenset(ls) for r, ls in out.items()}

    def receivers(self) -> list[int]:
        return sorted({t.dst for t in self.transfers})

    def copied(self) -> bool:
        """Whether every receiving rank has all its layers' state (a store read)."""
        keys = [contract.copied_key(self.generation, r) for r in self.receivers()]
        return self.store.check(keys)

    def on_committed(self, step: int, skipped: bool) -> None:
        """Engine hook: queue this step's final gradients of the layers sent away (once
        the snapshot is packed: the optimizer step about to run changes the state)."""
        for s in self._senders:
            s.packed.wait()  # the message: [step, skipped, gradients...]
            s.queue.put(self.held.flat_grads(s.layers, (step, 1.0 if skipped else 0.0)))

    def finish(self, step: int, timeout_s: float, abort_check: Callable[[], str | None]
               ) -> None:
        """At the switch: send (sender) or apply (receiver) every committed step up to
        `step`, then move the copies into the held layers; raises `StepAborted` when the
        job aborts meanwhile, `CommError` when a copy failed or took over `timeout_s`."""
        for s in self._senders:
            s.queue.put(None)  # after the last step's gradients: the end
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            while t.is_alive():
                t.join(0.02)
                reason = abort_check()
                if reason:
                    self.abandon()
                    raise StepAborted(f"background copy abandoned: {reason}")
                if time.monotonic() > deadline:
                    self.abandon()
                    raise CommError(f"background copy did not finish within {timeout_s:.0f}s")
        if self._error:
            raise CommError("background copy failed: " + "; ".join(self._error))
        for r in self._receivers:
            if r.applied != step:
                raise CommError(f"background copy from rank {r.peer} reached step "
                                f"{r.applied}, the switch is after step {step}")
            for i in r.layers:
                self.held.adopt(self.shadow, i)

    def abandon(self) -> None:
        """Stop every copy (a failure came first); its pending ops are left to the old
        generation's groups."""
        self._stop.set()

    # ---- for the workers ------------------------------------------------------------
    def _channel(self, src: int, dst: int) -> Comm:
        """A worker's own group with its peer, built on the worker's thread: off the
        transition's path (the survivors resume without waiting for it)."""
        ch = Channel(src, dst, KIND)
        return Comm(self.store, self.rank, self.generation, self.comm_cfg).open_channels([ch])

    def _wait(self, p: Pending) -> bool:
        while not p.done.wait(0.05):
            if self._stop.is_set():
                return False
        p.work.wait()
        return True

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = n if self.rate_Bps <= 0 else max(1 << 14, int(self.rate_Bps * _CHUNK_S / 4))
        return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]

    def _pace(self, t0: float, sent_bytes: float) -> None:
        if self.rate_Bps > 0:
            ahead = t0 + sent_bytes / self.rate_Bps - time.monotonic()
            if ahead > 0:
                self._stop.wait(ahead)

    def _received_all(self) -> None:
        with self._lock:
            self._waiting -= 1
            done = self._waiting == 0
        if done:
            self.copied_at = time.time()
            self.store.set(contract.copied_key(self.generation, self.rank), str(self.copied_at))


class _Sender:
    def __init__(self, bg: BackgroundCopy, peer: int, layers: list[int]):
        self.bg, self.peer, self.layers = bg, peer, layers
        self.packs: list[torch.Tensor] = []
        self.packed = threading.Event()  # the snapshot is taken (off the training path)
        self.queue: queue.Queue = queue.Queue()

    def __str__(self) -> str:
        return f"send-{self.peer}"

    def run(self) -> None:
        bg = self.bg
        try:
            # the state as committed: training only changes it in the optimizer step,
            # which waits for this (`on_committed`)
            try:
                self.packs = [bg.held.pack(i, bg.wire) for i in self.layers]
            finally:
                self.packed.set()
            comm = bg._channel(bg.rank, self.peer)
            t0, sent = time.monotonic(), 0.0
            for flat in self.packs:
                for a, b in bg._chunks(flat.numel()):
                    if not bg._wait(comm.send(flat[a:b], self.peer, KIND)):
                        return
                    sent += 4 * (b - a)
                    bg._pace(t0, sent)
            self.packs = []  # sent: the snapshot's memory goes back
            while not bg._stop.is_set():
                try:
                    msg = self.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                end = msg is None
                if end:  # as long as the others: the receiver posts one size
                    msg = torch.zeros(2 + bg.held.grad_numel(self.layers))
                    msg[0] = _END
                if not bg._wait(comm.send(msg.to(bg.wire), self.peer, KIND)) or end:
                    return
        except Exception as e:  # the coordinator reports it at the switch
            bg._error.append(f"to rank {self.peer}: {e}")


class _Receiver:
    def __init__(self, bg: BackgroundCopy, peer: int, layers: list[int], first_step: int):
        self.bg, self.peer, self.layers = bg, peer, layers
        self.applied = first_step - 1  # the committed step the copies are at

    def __str__(self) -> str:
        return f"recv-{self.peer}"

    def run(self) -> None:
        bg, shadow = self.bg, self.bg.shadow
        try:
            comm = bg._channel(self.peer, bg.rank)
            for i in self.layers:
                shadow.reset(i)
                buf = shadow.receive_buffer(i, bg.wire)
                for a, b in bg._chunks(buf.numel()):
                    if not bg._wait(comm.recv(buf[a:b], self.peer, KIND)):
                        return
                shadow.unpack(i, buf)
            bg._received_all()
            size = 2 + shadow.grad_numel(self.layers)
            while True:
                msg = torch.empty(size, device=bg.wire)
                if not bg._wait(comm.recv(msg, self.peer, KIND)):
                    return
                step = int(msg[0].item())
                if step == int(_END):
                    return
                if step != self.applied + 1:
                    raise RuntimeError(f"gradients of step {step} after step {self.applied}")
                shadow.set_flat_grads(self.layers, msg[2:].to(shadow.device))
                if msg[1].item() == 0.0:  # not skipped (fp16 overflow)
                    lr = bg.lr_at(step)
                    for i in self.layers:
                        shadow.step(i, i + 1, lr)
                for i in self.layers:  # only this worker's: another may be mid-step
                    shadow.optimizer(i).zero_grad(set_to_none=True)
                self.applied = step
        except Exception as e:
            bg._error.append(f"from rank {self.peer}: {e}")

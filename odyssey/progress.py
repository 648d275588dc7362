"""The leader's progress line: steps, ETA, samples/s, loss, current plan and generation.

On a terminal it is one line rewritten in place (`\\r`, at most every `min_redraw_s`);
elsewhere (a log file, a pipe, CI) it is a plain line every `every_s` seconds, so logs
stay readable. Other messages clear the line first (`interrupt`), then it is redrawn on
the next step. The ETA is the remaining steps times the median of the recent step times,
so the one slow step that absorbed a recovery does not swing it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from typing import TextIO

MODES = ("auto", "plain", "off")


def format_eta(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour up; '--:--' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(steps_left: int, recent_step_s: list[float]) -> float | None:
    """Remaining steps x median recent step time (None before any step)."""
    if not recent_step_s:
        return None
    return max(0, steps_left) * statistics.median(recent_step_s)


def format_line(*, step: int, total: int, loss: float, samples_per_s: float | None,
                eta_s: float | None, plan: str, gen: int, rank: int) -> str:
    """One progress line; `step` is the step just committed (0-based)."""
    done = step + 1
    pct = 100.0 * done / total if total else 100.0
    rate = f"{samples_per_s:.1f}" if samples_per_s is not None else "-"
    return (f"[gen {gen} step {step} rank {rank}] {done}/{total} {pct:3.0f}% | loss "
            f"{loss:.4f} | {rate} samples/s | ETA {format_eta(eta_s)} | plan {plan}")


class ProgressLine:
    """Prints the progress line; see the module docstring."""

    def __init__(self, total_steps: int, mode: str = "auto", every_s: float = 30.0,
                 stream: TextIO | None = None, tty: bool | None = None,
                 min_redraw_s: float = 0.2, window: int = 10):
        if mode not in MODES:
            raise ValueError(f"--progress must be one of {MODES}, got {mode!r}")
        self.total = total_steps
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = (isatty() if tty is None else tty) and mode == "auto"
        self.enabled = mode != "off"
        self.every_s = every_s
        self.min_redraw_s = min_redraw_s
        self.recent: deque[float] = deque(maxlen=window)
        self._last_print: float | None = None
        self._shown = False

    def update(self, *, step: int, loss: float, step_s: float, samples_per_s: float | None,
               plan: str, gen: int, rank: int, now: float | None = None) -> str | None:
        """Record a committed step; print if due. Returns the line printed, if any."""
        if not self.enabled:
            return None
        if step_s > 0:
            self.recent.append(step_s)
        now = time.monotonic() if now is None else now
        last = step == self.total - 1
        period = self.min_redraw_s if self.tty else self.every_s
        if self._last_print is None:
            self._last_print = now  # the first line waits a full period (startup noise)
            if not (self.tty or last):
                return None
        elif not last and now - self._last_print < period:
            return None
        line = format_line(step=step, total=self.total, loss=loss, samples_per_s=samples_per_s,
                           eta_s=eta_seconds(self.total - step - 1, list(self.recent)),
                           plan=plan, gen=gen, rank=rank)
        self._last_print = now
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def interrupt(self) -> None:
        """Clear the in-place line before someone else prints (it is redrawn later)."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        """End the in-place line (keep it on screen)."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False

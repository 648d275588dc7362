"""The leader's progress line: formatting, ETA, in-place vs periodic output, interrupts."""

from __future__ import annotations

import io

import pytest

from odyssey.progress import ProgressLine, eta_seconds, format_eta, format_line


def test_eta_formatting():
    assert format_eta(None) == "--:--"
    assert format_eta(float("nan")) == "--:--"
    assert format_eta(0) == "0:00"
    assert format_eta(59.6) == "1:00"
    assert format_eta(754) == "12:34"
    assert format_eta(3600 + 62) == "1:01:02"


def test_eta_uses_the_median_of_recent_steps():
    # one 30 s step (a recovery) among 1 s steps does not swing the estimate
    assert eta_seconds(10, [1.0, 1.0, 30.0, 1.0, 1.0]) == 10.0
    assert eta_seconds(0, [2.0]) == 0.0
    assert eta_seconds(5, []) is None


def test_line_format():
    line = format_line(step=36, total=60, loss=2.31414, samples_per_s=41.23, eta_s=23.2,
                       plan="reroute 2+1 stages, 3 ranks", gen=1, rank=0)
    assert line == ("[gen 1 step 36 rank 0] 37/60  62% | loss 2.3141 | 41.2 samples/s | "
                    "ETA 0:23 | plan reroute 2+1 stages, 3 ranks")
    assert "| - samples/s |" in format_line(step=0, total=1, loss=1.0, samples_per_s=None,
                                            eta_s=None, plan="p", gen=0, rank=2)


def _update(p: ProgressLine, step: int, now: float) -> str | None:
    return p.update(step=step, loss=1.0, step_s=0.5, samples_per_s=16.0,
                    plan="initial 2 stages, 2 ranks", gen=0, rank=0, now=now)


def test_tty_rewrites_one_line_and_clears_it_for_other_messages():
    out = io.StringIO()
    p = ProgressLine(10, "auto", stream=out, tty=True, min_redraw_s=0.2)
    assert _update(p, 0, now=0.0) is not None
    assert _update(p, 1, now=0.1) is None  # redraws are rate-limited
    line = _update(p, 2, now=0.5)
    assert "3/10" in line and "ETA 0:04" in line  # 7 steps x 0.5 s
    assert out.getvalue().count("\r\033[K") == 2 and "\n" not in out.getvalue()
    p.interrupt()
    assert out.getvalue().endswith("\r\033[K")
    p.interrupt()  # nothing shown: nothing to clear
    assert out.getvalue().count("\r\033[K") == 3
    _update(p, 9, now=0.6)  # the last step always prints
    p.close()
    assert out.getvalue().endswith("10/10 100% | loss 1.0000 | 16.0 samples/s | ETA 0:00 | "
                                   "plan initial 2 stages, 2 ranks\n")


def test_plain_lines_every_period_when_not_a_terminal():
    out = io.StringIO()
    p = ProgressLine(100, "auto", every_s=30.0, stream=out, tty=False)
    printed = [s for s in range(60) if _update(p, s, now=s * 1.0) is not None]
    assert printed == [30]  # the first waits a full period; then every 30 s
    assert _update(p, 99, now=61.0) is not None  # the last step always prints
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 2


def test_plain_mode_on_a_terminal_and_off():
    out = io.StringIO()
    p = ProgressLine(3, "plain", every_s=0.0, stream=out, tty=True)
    for s in range(3):
        _update(p, s, now=float(s))
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 2
    off = io.StringIO()
    q = ProgressLine(3, "off", stream=off, tty=True)
    assert all(_update(q, s, now=float(s)) is None for s in range(3)) and not off.getvalue()
    with pytest.raises(ValueError, match="--progress must be one of"):
        ProgressLine(3, "fancy")

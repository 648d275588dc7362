"""Serving profile: inference time tables of a KV-cache model, measured and stored as JSON.

Vidur-style decomposition of one continuous-batching iteration into parts, each a table
measured on this machine and interpolated piecewise-linearly between its points:

- `dense[T]`: embedding + every block's norms, QKV, projection and MLP on T tokens (the
  prefill tokens of the batch plus one per decoding request);
- `prefill_attn[p]`: causal attention of one prompt of p tokens, all blocks (+ cache fill);
- `decode_step[B][L]`: a whole decode-only iteration of B requests with L cached tokens
  each (embedding, dense, attention, head, batching); looked up by batch size and *total*
  KV length B*L (a mixed-length decode batch costs what a uniform one with the same B and
  total KV costs). Decode-only iterations dominate TPOT, so they are measured whole, not
  summed from parts; a mixed batch adds its prompts' parts on top;
- `head[S]`: final norm + LM head + argmax on S rows (one per request);
- `overhead`: per-iteration and per-prompt time that no part covers (Python batching,
  concatenation), fitted by least squares to whole prefill and mixed iterations timed at
  calibration shapes (decode-only ones carry theirs inside `decode_step`);
- `wake_s`: extra time of the first iteration after the server sat idle (caches and TLBs
  refilled after other work ran on the core; on the wall clock also the sleep's overshoot),
  measured as idle-then-iterate minus back-to-back pairs at calibration shapes.

Plus KV-cache bytes per token and parameter bytes. This module is the data file and its
lookups (no torch); `profiler/serving_profiler.py` measures it
(`python examples/profile_serving.py --help` for the example GPT).
"""

from __future__ import annotations

import json
import statistics
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

SERVING_PROFILE_VERSION = 1


class ServingProfileError(ValueError):
    """A serving profile that cannot be used, or a lookup outside its measured range."""


def interp1(xs: list[float], ys: list[float], x: float, what: str = "table",
            max_extrapolation: float = 1.5) -> float:
    """Piecewise-linear y(x); 0 at x = 0; extrapolates the last segment up to
    `max_extrapolation` x the largest measured point and raises beyond it."""
    if x == 0:
        return 0.0
    if x < 0:
        raise ServingProfileError(f"{what}: negative argument {x}")
    if x > xs[-1] * max_extrapolation:
        raise ServingProfileError(
            f"{what}: {x:g} is far outside the measured range [{xs[0]:g}, {xs[-1]:g}]; "
            f"re-profile with a larger grid")
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    if x <= xs[0]:  # between 0 and the first point: scale towards the first point
        i = 1
    else:
        i = min(bisect_right(xs, x), len(xs) - 1)
        if xs[i - 1] == x:
            return ys[i - 1]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class ServingProfile:
    """Inference tables of one model on one machine; see the module docstring."""

    model: dict
    """Model sizes: vocab_size, context, d_model, n_heads, n_blocks."""
    device: dict
    """Where it was measured (host, torch, threads)."""
    kv_bytes_per_token: float
    """KV-cache bytes per token slot, all blocks, K and V (measured from a cache)."""
    param_bytes: float
    """Parameter bytes of the whole model."""
    dense_tokens: list[int]
    """Token counts T of the dense table, ascending."""
    dense_s: list[float]
    """Dense time of all blocks + embedding at each T, seconds."""
    prefill_lens: list[int]
    """Prompt lengths p of the prefill-attention table, ascending."""
    prefill_attn_s: list[float]
    """Attention time of one prompt of length p, all blocks, seconds."""
    decode_batch: list[int]
    """Batch sizes B of the decode-attention table, ascending."""
    decode_kv: list[int]
    """KV lengths L per request of the decode-attention table, ascending."""
    decode_step_s: list[list[float]]
    """decode_step_s[i][j]: decode-only iteration of decode_batch[i] requests holding
    decode_kv[j] tokens each, seconds."""
    head_rows: list[int]
    """Row counts S of the head table, ascending."""
    head_s: list[float]
    """Head time on S rows, seconds."""
    overhead_s: float = 0.0
    """Fitted per-iteration time of an iteration with prompts not in any table."""
    overhead_per_request_s: float = 0.0
    """Fitted per-prompt time not in any table."""
    wake_s: float = 0.0
    """Measured extra time of the first iteration after an idle wait (a real server that
    sleeps between arrivals pays it; the CPU-clock replay, which never sleeps, does not)."""
    calibration: list[dict] = field(default_factory=list)
    """Whole iterations timed to fit the overhead: batch shape, measured and parts sum."""
    version: int = SERVING_PROFILE_VERSION
    """File format version."""

    # ---- lookups ----------------------------------------------------------------------
    def dense(self, tokens: float) -> float:
        return interp1(self.dense_tokens, self.dense_s, tokens, "dense[tokens]")

    def prefill_attn(self, prompt_len: float) -> float:
        return interp1(self.prefill_lens, self.prefill_attn_s, prompt_len,
                       "prefill_attn[prompt_len]")

    def head(self, rows: float) -> float:
        return interp1(self.head_rows, self.head_s, rows, "head[rows]")

    def decode_step(self, batch: int, total_kv: float) -> float:
        """Decode-only iteration of `batch` requests holding `total_kv` tokens together."""
        if batch == 0:
            return 0.0
        bs, per = self.decode_batch, total_kv / batch
        # bilinear: along L within each bracketing batch row, then along B
        i = min(max(bisect_right(bs, batch), 1), len(bs) - 1) if len(bs) > 1 else 0
        rows = [i - 1, i] if len(bs) > 1 else [0]
        vals = [interp1(self.decode_kv, self.decode_step_s[r], per,
                        f"decode_step[kv per request] at batch {bs[r]}") for r in rows]
        if len(rows) == 1:
            return vals[0] * batch / bs[0]
        return interp1([bs[i - 1], bs[i]], vals, batch, "decode_step[batch]",
                       max_extrapolation=bs[-1] * 1.5 / bs[i])

    # ---- validation and files -----------------------------------------------------------
    def check(self) -> ServingProfile:
        errs = []
        if self.version != SERVING_PROFILE_VERSION:
            errs.append(f"version {self.version!r} is not supported "
                        f"(expected {SERVING_PROFILE_VERSION})")
        for xs_name, ys_name in (("dense_tokens", "dense_s"), ("prefill_lens", "prefill_attn_s"),
                                 ("head_rows", "head_s")):
            xs, ys = getattr(self, xs_name), getattr(self, ys_name)
            _check_axis(xs, xs_name, errs)
            if len(ys) != len(xs):
                errs.append(f"{ys_name} has {len(ys)} values for {len(xs)} {xs_name}")
            if any(not y >= 0 for y in ys):
                errs.append(f"{ys_name} has a negative or NaN value")
        _check_axis(self.decode_batch, "decode_batch", errs)
        _check_axis(self.decode_kv, "decode_kv", errs)
        if len(self.decode_step_s) != len(self.decode_batch) or any(
                len(row) != len(self.decode_kv) for row in self.decode_step_s):
            errs.append(f"decode_step_s must be {len(self.decode_batch)} x "
                        f"{len(self.decode_kv)} (decode_batch x decode_kv)")
        if not self.wake_s >= 0:
            errs.append(f"wake_s must be >= 0, got {self.wake_s}")
        if not self.kv_bytes_per_token > 0:
            errs.append(f"kv_bytes_per_token must be > 0, got {self.kv_bytes_per_token}")
        for k in ("d_model", "n_heads", "n_blocks", "context"):
            if not isinstance(self.model.get(k), int) or self.model[k] < 1:
                errs.append(f"model.{k} must be a positive integer, got {self.model.get(k)!r}")
        if errs:
            raise ServingProfileError("invalid serving profile:\n  - " + "\n  - ".join(errs))
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_dict(cls, d: dict) -> ServingProfile:
        if not isinstance(d, dict):
            raise ServingProfileError(f"serving profile must be a JSON object, "
                                      f"got {type(d).__name__}")
        if d.get("version") != SERVING_PROFILE_VERSION:
            raise ServingProfileError(f"serving profile version {d.get('version')!r} is not "
                                      f"supported (expected {SERVING_PROFILE_VERSION})")
        try:
            return cls(**d).check()
        except TypeError as e:
            raise ServingProfileError(f"malformed serving profile: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> ServingProfile:
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise ServingProfileError(f"cannot read serving profile {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise ServingProfileError(f"{path}: not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ServingProfileError as e:
            raise ServingProfileError(f"{path}: {e}") from e


def _check_axis(xs: list, name: str, errs: list[str]) -> None:
    if not xs or any(not x > 0 for x in xs) or sorted(set(xs)) != list(xs):
        errs.append(f"{name} {xs} must be non-empty, positive, unique and ascending")


# ---- measuring ---------------------------------------------------------------------------
def median_profile(profiles: list[ServingProfile]) -> ServingProfile:
    """Element-wise median of profiles of one model measured at different times (spreads
    a shared machine's slow and fast periods over the tables); grids must match."""
    if not profiles:
        raise ServingProfileError("median_profile needs at least one profile")
    first = profiles[0]
    for p in profiles[1:]:
        for name in ("model", "dense_tokens", "prefill_lens", "decode_batch", "decode_kv",
                     "head_rows"):
            if getattr(p, name) != getattr(first, name):
                raise ServingProfileError(f"profiles differ in {name}; cannot combine them")
    med = statistics.median
    return ServingProfile(
        model=dict(first.model), device={**first.device, "combined": len(profiles)},
        kv_bytes_per_token=first.kv_bytes_per_token, param_bytes=first.param_bytes,
        dense_tokens=list(first.dense_tokens),
        dense_s=[med(v) for v in zip(*(p.dense_s for p in profiles))],
        prefill_lens=list(first.prefill_lens),
        prefill_attn_s=[med(v) for v in zip(*(p.prefill_attn_s for p in profiles))],
        decode_batch=list(first.decode_batch), decode_kv=list(first.decode_kv),
        decode_step_s=[[med(v) for v in zip(*rows)]
                       for rows in zip(*(p.decode_step_s for p in profiles))],
        head_rows=list(first.head_rows),
        head_s=[med(v) for v in zip(*(p.head_s for p in profiles))],
        overhead_s=med(p.overhead_s for p in profiles),
        overhead_per_request_s=med(p.overhead_per_request_s for p in profiles),
        wake_s=med(p.wake_s for p in profiles),
        calibration=[row for p in profiles for row in p.calibration]).check()


def iteration_parts(prof: ServingProfile, pre: list[int], dec: list[int]) -> float:
    """An iteration from the tables alone (no overhead terms). A decode-only batch is its
    `decode_step` entry; prompts add their dense rows, attention and head rows on top."""
    b = len(dec)
    base = prof.decode_step(b, sum(dec)) if b else 0.0
    if not pre:
        return base
    extra = (prof.dense(sum(pre) + b) - prof.dense(b) + sum(prof.prefill_attn(p) for p in pre)
             + prof.head(len(pre) + b) - prof.head(b))
    return base + extra

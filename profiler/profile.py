"""`Profile`: what the performance model knows about a model on a machine.

A profile is a JSON data file (no torch needed to read it): per-layer forward and
backward time, activation bytes saved for backward and boundary (output) bytes, each at
several microbatch sizes (linear interpolation in between), parameter bytes, optimizer
step time, and communication fits (alpha + bytes/beta per collective and link class)
with the raw points they were fitted to.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILE_VERSION = 1
KINDS = ("measured", "emulated", "formula")
LINKS = ("intra", "inter")


class ProfileError(ValueError):
    """A profile that cannot be used; the message says which field is wrong."""


@dataclass
class LinkFit:
    """Time of one message (or one collective) over one link class: alpha + bytes/beta.

    For all-reduce the fit is to the ring model 2(n-1)*alpha + 2(n-1)/n * bytes/beta.
    """

    alpha_s: float
    """Latency term, seconds."""
    beta_Bps: float
    """Bandwidth term, bytes per second."""
    points: list[list[float]] = field(default_factory=list)
    """Raw measurements [bytes, group_size, seconds] the fit came from (empty if assumed)."""
    source: str = "measured"
    """'measured', 'assumed' (given on the command line) or 'formula'."""

    def p2p_s(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.beta_Bps

    def ring_allreduce_s(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * nbytes / self.beta_Bps


@dataclass
class CommProfile:
    """Communication fits per link class ('intra' node; 'inter' node when known)."""

    p2p: dict[str, LinkFit] = field(default_factory=dict)
    """Point-to-point send/recv fits by link class."""
    allreduce: dict[str, LinkFit] = field(default_factory=dict)
    """All-reduce fits (ring model) by link class."""
    commit_s: float = 1e-3
    """Duration of the commit decision (one compare-and-set round trip to the store)."""

    def link(self, table: str, link: str) -> LinkFit:
        """The fit for `link`; an unknown 'inter' falls back to 'intra' (optimistic)."""
        fits = self.p2p if table == "p2p" else self.allreduce
        if link in fits:
            return fits[link]
        if "intra" in fits:
            return fits["intra"]
        raise ProfileError(f"profile has no {table} fit for link class {link!r}")


@dataclass
class LayerProfile:
    """Measurements of one layer; list fields align with `Profile.microbatch_sizes`."""

    index: int
    """Layer index in the model."""
    name: str
    """Module class name (for reports)."""
    param_count: int
    """Parameter elements."""
    param_bytes: int
    """Parameter bytes (gradients have the same size and dtype)."""
    forward_s: list[float]
    """Forward time per microbatch, seconds, at each microbatch size."""
    backward_s: list[float]
    """Backward time per microbatch, seconds, at each microbatch size (measured, not 2x)."""
    activation_bytes: list[float]
    """Bytes saved for backward per microbatch (unique storages, parameters excluded)."""
    output_bytes: list[float]
    """Bytes of the layer output per microbatch (what crosses a stage boundary)."""
    optimizer_s: float = 0.0
    """Optimizer step time for this layer's parameters, seconds."""


@dataclass
class Profile:
    """A model's per-layer table plus communication fits; see the module docstring."""

    kind: str
    """'measured' (timed on a device), 'emulated' (configured sleeps) or 'formula'."""
    device: dict
    """Description of the device (name, torch version, host, assumed TFLOP/s, ...)."""
    config: dict
    """The run configuration that produced the profile (model sizes, repeats, ...)."""
    model: str
    """Model name, e.g. 'gpt-4x64'."""
    microbatch_sizes: list[int]
    """Microbatch sizes measured, ascending."""
    layers: list[LayerProfile]
    """One entry per layer, in order."""
    comm: CommProfile = field(default_factory=CommProfile)
    """Communication fits."""
    grad_bytes_per_param: float = 4.0
    """Gradient bytes per parameter element."""
    optimizer_bytes_per_param: float = 8.0
    """Optimizer state bytes per parameter element (AdamW: two fp32 moments = 8)."""
    version: int = PROFILE_VERSION
    """File format version."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ---- interpolated lookups -------------------------------------------------------
    def forward_s(self, layer: int, mb: int) -> float:
        return self._interp(self.layers[layer].forward_s, mb)

    def backward_s(self, layer: int, mb: int) -> float:
        return self._interp(self.layers[layer].backward_s, mb)

    def activation_bytes(self, layer: int, mb: int) -> float:
        return self._interp(self.layers[layer].activation_bytes, mb)

    def output_bytes(self, layer: int, mb: int) -> float:
        return self._interp(self.layers[layer].output_bytes, mb)

    def column(self, name: str, mb: int) -> list[float]:
        """One interpolated value per layer, e.g. column('forward_s', 4)."""
        return [self._interp(getattr(lp, name), mb) for lp in self.layers]

    def _interp(self, values: list[float], mb: int) -> float:
        return interpolate(self.microbatch_sizes, values, mb)

    # ---- validation -----------------------------------------------------------------
    def check(self, num_layers: int | None = None) -> Profile:
        """Raise `ProfileError` naming every problem; return self when usable."""
        errs: list[str] = []
        if self.version != PROFILE_VERSION:
            errs.append(f"version {self.version!r} is not supported (expected {PROFILE_VERSION})")
        if self.kind not in KINDS:
            errs.append(f"kind {self.kind!r} is not one of {KINDS}")
        mbs = self.microbatch_sizes
        if not mbs or any(m < 1 for m in mbs) or sorted(set(mbs)) != list(mbs):
            errs.append(f"microbatch_sizes {mbs} must be positive, unique and ascending")
        if not self.layers:
            errs.append("profile has no layers")
        if num_layers is not None and len(self.layers) != num_layers:
            errs.append(f"profile has {len(self.layers)} layers but the model has {num_layers}")
        for i, lp in enumerate(self.layers):
            if lp.index != i:
                errs.append(f"layer entry {i} has index {lp.index}")
            for name in ("forward_s", "backward_s", "activation_bytes", "output_bytes"):
                vals = getattr(lp, name)
                if len(vals) != len(mbs):
                    errs.append(f"layer {i}: {name} has {len(vals)} values for "
                                f"{len(mbs)} microbatch sizes")
                elif any(v < 0 for v in vals):
                    errs.append(f"layer {i}: {name} has a negative value {vals}")
            if lp.param_bytes < 0 or lp.param_count < 0:
                errs.append(f"layer {i}: negative parameter size")
        for table in ("p2p", "allreduce"):
            fits = getattr(self.comm, table)
            if "intra" not in fits:
                errs.append(f"comm.{table} has no 'intra' link fit")
            for link, fit in fits.items():
                if link not in LINKS:
                    errs.append(f"comm.{table}: unknown link class {link!r}")
                if not (fit.alpha_s >= 0 and fit.beta_Bps > 0):
                    errs.append(f"comm.{table}.{link}: alpha must be >= 0 and beta > 0")
        if errs:
            raise ProfileError("invalid profile:\n  - " + "\n  - ".join(errs))
        return self

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict, num_layers: int | None = None) -> Profile:
        if not isinstance(d, dict):
            raise ProfileError(f"profile must be a JSON object, got {type(d).__name__}")
        if "version" not in d:
            raise ProfileError("profile has no 'version' field (not an Odyssey profile?)")
        if d["version"] != PROFILE_VERSION:
            raise ProfileError(
                f"profile version {d['version']!r} is not supported (expected "
                f"{PROFILE_VERSION}); re-run `odyssey profile`")
        missing = [k for k in ("kind", "device", "config", "model", "microbatch_sizes",
                               "layers", "comm") if k not in d]
        if missing:
            raise ProfileError(f"profile is missing field(s) {missing}")
        try:
            comm = d["comm"]
            prof = cls(
                kind=str(d["kind"]), device=dict(d["device"]), config=dict(d["config"]),
                model=str(d["model"]),
                microbatch_sizes=[int(m) for m in d["microbatch_sizes"]],
                layers=[_layer_from_dict(i, x) for i, x in enumerate(d["layers"])],
                comm=CommProfile(
                    p2p={k: LinkFit(**v) for k, v in comm["p2p"].items()},
                    allreduce={k: LinkFit(**v) for k, v in comm["allreduce"].items()},
                    commit_s=float(comm.get("commit_s", 1e-3)),
                ),
                grad_bytes_per_param=float(d.get("grad_bytes_per_param", 4.0)),
                optimizer_bytes_per_param=float(d.get("optimizer_bytes_per_param", 8.0)),
                version=int(d["version"]),
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"malformed profile: {type(e).__name__}: {e}") from e
        return prof.check(num_layers)

    @classmethod
    def from_json(cls, text: str, num_layers: int | None = None) -> Profile:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile is not valid JSON: {e}") from e
        return cls.from_dict(d, num_layers)

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> Profile:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from e
        try:
            return cls.from_json(text, num_layers)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from e


_LAYER_FIELDS = ("index", "name", "param_count", "param_bytes", "forward_s", "backward_s",
                 "activation_bytes", "output_bytes")


def _layer_from_dict(i: int, x: dict) -> LayerProfile:
    missing = [k for k in _LAYER_FIELDS if k not in x]
    if missing:
        raise ProfileError(f"layer entry {i} is missing field(s) {missing}")
    return LayerProfile(
        index=int(x["index"]), name=str(x["name"]), param_count=int(x["param_count"]),
        param_bytes=int(x["param_bytes"]),
        forward_s=[float(v) for v in x["forward_s"]],
        backward_s=[float(v) for v in x["backward_s"]],
        activation_bytes=[float(v) for v in x["activation_bytes"]],
        output_bytes=[float(v) for v in x["output_bytes"]],
        optimizer_s=float(x.get("optimizer_s", 0.0)),
    )


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through (xs, ys); linear extrapolation outside, never < 0.

    With a single point the value scales proportionally with x (time and bytes per
    microbatch grow with its size).
    """
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return ys[i]
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))

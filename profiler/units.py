"""Byte sizes: one parser ("512MiB", "6GiB", "1.5GB", ints) and one formatter ("1.50 GiB").

The lowest layer of the project, so the planner's reports, Chameleon's budgets and the
CLIs all read and print sizes the same way.
"""

from __future__ import annotations

import re

KiB = 1024.0
MiB = float(1 << 20)
GiB = float(1 << 30)

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int, a float or a string such as "512MiB", "6GiB", "1.5GB", "4096"."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError(f"size must be >= 0, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r}; use e.g. 512MiB, 6GiB, 1.5GB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(nbytes: float) -> str:
    """Human-readable binary size: "512 B", "1.50 KiB", ... up to GiB (larger stays GiB)."""
    n = float(nbytes)
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"

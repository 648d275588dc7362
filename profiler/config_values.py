"""From text (a flag's value, a config file's entry) to a config field's value.

`shape_of(type)` says how a field of that type is read: bool, a scalar (int, float, str, or
a union of them such as `int | str`), or a sequence (`tuple[X, ...]`, `tuple[X, Y]`,
`list[X]`, and `X | tuple[X, ...]`, which is X when given one value). Anything else has no
text form and must be excluded from a CLI. `load_file` reads a TOML or JSON config file.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML config files need 3.11; JSON works anywhere
    tomllib = None


@dataclass(frozen=True)
class Shape:
    """How one field's text becomes a value."""

    kind: str  # "bool", "scalar" or "seq"
    convert: Callable[[str], Any]  # one value (an element, for "seq")
    accepts: tuple[type, ...]  # python types a config-file value may already have
    container: type = tuple
    arity: int | None = None  # fixed tuple length (tuple[float, float])
    scalar_if_one: bool = False  # X | tuple[X, ...]


def _union_args(tp) -> list | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return None


def _scalar(tp) -> tuple[Callable[[str], Any], tuple[type, ...]] | None:
    if tp in (int, float, str):
        return tp, ((int, float) if tp is float else (tp,))
    members = _union_args(tp)
    if members and all(m in (int, float, str) for m in members):
        order = sorted(members, key=lambda m: m is str)  # str last: it accepts anything

        def convert(text: str):
            for m in order:
                try:
                    return m(text)
                except ValueError:
                    continue
            raise ValueError(f"not one of {[m.__name__ for m in members]}: {text!r}")

        return convert, tuple(members)
    return None


def shape_of(tp, where: str) -> Shape:
    members = _union_args(tp)
    if members and len(members) == 1:
        tp, members = members[0], None
    if tp is bool:
        return Shape("bool", bool, (bool,))
    if (s := _scalar(tp)) is not None:
        return Shape("scalar", *s)
    if members and len(members) == 2:  # X | tuple[X, ...]
        seqs = [m for m in members if typing.get_origin(m) in (tuple, list)]
        if len(seqs) == 1:
            inner = shape_of(seqs[0], where)
            other = next(m for m in members if m is not seqs[0])
            if inner.kind == "seq" and other in inner.accepts:
                return replace(inner, scalar_if_one=True)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list) and args:
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        elems = set(args) - {Ellipsis}
        if len(elems) == 1 and (s := _scalar(next(iter(elems)))) is not None:
            return Shape("seq", *s, container=origin, arity=len(args) if fixed else None)
    raise TypeError(f"{where}: type {tp} has no command-line form; exclude the field "
                    "(section(..., exclude=...)) or give it a simpler type")


def split_values(text: str, split: bool) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()] if split else [text]


def finish(items: list, shape: Shape, where: str):
    if shape.arity is not None and len(items) != shape.arity:
        raise ValueError(f"{where} takes {shape.arity} values, got {len(items)}: {items}")
    if shape.scalar_if_one and len(items) == 1:
        return items[0]
    return shape.container(items)


def from_file_value(value, shape: Shape, split: bool, where: str):
    """A config-file value (already typed by TOML/JSON, or text) as the field's value."""
    expected = "/".join(t.__name__ for t in shape.accepts)

    def one(v):
        if isinstance(v, str) and str not in shape.accepts:
            try:
                return shape.convert(v)
            except ValueError:
                raise ValueError(f"{where}: expected {expected}, got {v!r}") from None
        if isinstance(v, bool) != (bool in shape.accepts) or not isinstance(v, shape.accepts):
            raise ValueError(f"{where}: expected {expected}, got {v!r}")
        return v

    if shape.kind != "seq":
        return one(value)
    if isinstance(value, str):
        value = split_values(value, split)
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return finish([one(v) for v in value], shape, where)


class ConfigError(ValueError):
    """A config file or value that does not fit the config tree."""


def load_file(path: str | Path) -> dict:
    """A config file's nested tables: TOML (.toml) or JSON (anything else)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    if p.suffix == ".toml" and tomllib is None:
        raise ConfigError(f"{p}: TOML config files need Python 3.11+ (use JSON)")
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:] or 'JSON'}: {e}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table (an object) of sections")
    return data

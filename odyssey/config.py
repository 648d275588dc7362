"""Build argparse options from config dataclasses, using each field's docstring as help.

Every component owns one dataclass with a docstring under each field; the CLI is
generated from them so flags and documentation cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each annotated field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and args:
        return _base_type(args[0])
    if origin in (list, tuple):
        return (origin, _base_type(args[0]) if args else str)
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str | None = None,
                       prefix: str = ""):
    """Add one `--[prefix-]field-name` option per field of dataclass `cls`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group or cls.__name__) if group is not False else parser
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        dest = f"{prefix}_{f.name}" if prefix else f.name
        flag = "--" + dest.replace("_", "-")
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        tp = _base_type(hints[f.name])
        if tp is bool:
            target.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif isinstance(tp, tuple):
            target.add_argument(flag, dest=dest, nargs="*", type=tp[1], default=default,
                                help=help_text)
        else:
            conv = tp if tp in (int, float, str) else str
            target.add_argument(flag, dest=dest, type=conv, default=default, help=help_text)
    return parser


def from_args(cls: type, ns: argparse.Namespace, prefix: str = ""):
    """Instantiate `cls` from parsed args (fields missing from `ns` keep defaults)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = f"{prefix}_{f.name}" if prefix else f.name
        if hasattr(ns, dest):
            value = getattr(ns, dest)
            if isinstance(value, list) and typing.get_origin(
                    _strip_optional(typing.get_type_hints(cls)[f.name])) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def _strip_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return args[0] if args else tp
    return tp

"""Config dataclasses -> command-line flags and config files, one way for every CLI.

Each component owns a dataclass with a docstring under each field and its checks in
`__post_init__`; a root dataclass nests them (a field whose type is a dataclass is a
section). `ConfigParser(Root)` generates the flags from that tree:

* field `steps` of section `training` -> `--training.steps`, help = its docstring; a
  section declared with `section(..., flat=True)` adds its fields without a namespace;
* bool -> `--x` / `--no-x` (`--swap.recompute` / `--swap.no-recompute`); a tuple takes
  one or more values per use and may be repeated (`--inject a --inject b`, or `--inject a
  b`); values are also split on commas (`--microbatch-sizes 1,2,4`) unless the field is
  `verbatim()`; `X | tuple[X, ...]` is X when given one value (`profiler.config_values`
  reads every type);
* aliases come from one table, {short flag: dotted field path}, e.g. {"dp":
  "parallelism.dp"}; a key `"gpt-*"` with value `"gpt"` aliases every field of a section;
* `--config FILE` (.toml or .json: one table per section, python field names) may set any
  field; flags override the file; an unknown key is an error that names it.

It lives in profiler/, the lowest layer, so the CLIs of every package can use it.
`add_dataclass_args`/`from_args` are the flat form for a script's own small dataclass
(`--prefix-field` flags with real defaults, no config file).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from profiler.config_values import (
    ConfigError,
    Shape,
    finish,
    from_file_value,
    load_file,
    shape_of,
    split_values,
)

_SECTION = "configtree.section"
_VERBATIM = "configtree.verbatim"


@dataclass(frozen=True)
class _SectionSpec:
    flat: bool = False
    exclude: frozenset[str] = frozenset()


def section(cls: type, *, default: Any = None, flat: bool = False,
            exclude: Iterable[str] = ()) -> Any:
    """A nested component config field: `cls()` (or a copy of `default`) by default.

    `flat`: its flags carry no `name.` namespace. `exclude`: its fields that are not
    configurable here (set by the program, e.g. a transport address); "sub.field" reaches
    into a section nested in it."""
    factory = cls if default is None else (lambda: dataclasses.replace(default))
    return dataclasses.field(default_factory=factory,
                             metadata={_SECTION: _SectionSpec(flat, frozenset(exclude))})


def verbatim(default: tuple = ()) -> Any:
    """A tuple field whose values are never split on commas (they contain commas)."""
    return dataclasses.field(default=default, metadata={_VERBATIM: True})


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


# ---- the tree ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # python names from the root, e.g. ("parallelism", "dp")
    flag: str
    shape: Shape
    default: Any
    doc: str
    split: bool
    required: bool

    @property
    def dest(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class _Group:
    title: str
    description: str
    options: list[_Option]


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _groups(cls: type, defaults: Any, path: tuple[str, ...], prefix: str,
            exclude: frozenset[str], title: str) -> list[_Group]:
    """The option groups of `cls` (a section at `path`), its own fields first."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    own: list[_Option] = []
    nested: list[_Group] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in exclude:
            continue
        tp = hints[f.name]
        default = (getattr(defaults, f.name) if defaults is not None else _field_default(f))
        if _is_section(tp):
            spec = f.metadata.get(_SECTION, _SectionSpec())
            sub = prefix if spec.flat else f"{prefix}{_dash(f.name)}."
            inner = spec.exclude | {e.split(".", 1)[1] for e in exclude
                                    if e.startswith(f.name + ".")}
            nested += _groups(tp, default if default is not dataclasses.MISSING else None,
                              (*path, f.name), sub, inner, sub.rstrip(".") or _dash(f.name))
            continue
        where = ".".join((*path, f.name))
        own.append(_Option((*path, f.name), f"--{prefix}{_dash(f.name)}", shape_of(tp, where),
                           default, docs.get(f.name, ""), not f.metadata.get(_VERBATIM),
                           default is dataclasses.MISSING))
    if not own:
        return nested
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return [_Group(title, doc, own), *nested]


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    if value == "":
        return "''"
    return str(value)


def _negated(flag: str) -> str:
    """--x -> --no-x; --swap.recompute -> --swap.no-recompute."""
    head, _, name = flag[2:].rpartition(".")
    return f"--{head}.no-{name}" if head else f"--no-{name}"


class _Bool(argparse.Action):
    """--x sets True, its `_negated` form False."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negative = set(option_strings[len(option_strings) // 2:])

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negative)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _Extend(argparse.Action):
    """Repeatable, several values per use; each value may be comma-separated."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        for v in values:
            items.extend(v)
        setattr(namespace, self.dest, items)


def _add_option(target, opt: _Option, flags: list[str], default: Any) -> None:
    help_text = opt.doc + ("" if opt.required else f" (default: {_show(opt.default)})")
    kw: dict[str, Any] = {"dest": opt.dest, "default": default,
                          "help": help_text.replace("%", "%%")}
    if opt.shape.kind == "bool":
        target.add_argument(*flags, *map(_negated, flags), action=_Bool, **kw)
        return
    kw["metavar"] = opt.path[-1].upper()
    if opt.shape.kind == "seq":
        def convert(text: str, opt=opt) -> list:
            return [opt.shape.convert(p) for p in split_values(text, opt.split)]
        convert.__name__ = opt.shape.convert.__name__  # argparse names it in errors
        target.add_argument(*flags, nargs="+", action=_Extend, type=convert, **kw)
    else:
        target.add_argument(*flags, type=opt.shape.convert, **kw)


def _alias_table(groups: list[_Group], aliases: Mapping[str, str]) -> dict[str, list[str]]:
    """dest -> extra flags, from {short: dotted path} and {"pre-*": section}."""
    by_dest = {o.dest: o for g in groups for o in g.options}
    extra: dict[str, list[str]] = {}
    for short, target in aliases.items():
        if short.endswith("*"):
            hits = [d for d in by_dest if d.startswith(target + ".")]
            if not hits:
                raise ValueError(f"alias --{short}: no section {target!r}")
            for d in hits:
                extra.setdefault(d, []).append(f"--{short[:-1]}{_dash(d[len(target) + 1:])}")
        elif target in by_dest:
            extra.setdefault(target, []).append(f"--{short}")
        else:
            raise ValueError(f"alias --{short}: no field {target!r}")
    return extra


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def build(cls: type, values: Mapping[str, Any], base: Any = None):
    """`cls` from nested {field: value} (sections as dicts), on top of `base` (an
    instance) or the fields' defaults; runs every component's `__post_init__`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_section(hints[f.name]):
            sub = getattr(base, f.name) if base is not None else _field_default(f)
            given = values.get(f.name)
            kwargs[f.name] = build(hints[f.name], given, sub) if given else sub
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


class ConfigParser(argparse.ArgumentParser):
    """An argument parser generated from a root config dataclass; see the module doc."""

    def __init__(self, root: type, *, aliases: Mapping[str, str] | None = None,
                 config_file: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = root
        if config_file:
            self.add_argument("--config", dest="_config_file", metavar="FILE", default=None,
                              help="TOML or JSON file setting any field (a table per section, "
                                   "python field names); flags override it")
        self._groups = _groups(root, None, (), "", frozenset(), root.__name__)
        self._options = {o.dest: o for g in self._groups for o in g.options}
        extra = _alias_table(self._groups, aliases or {})
        for g in self._groups:
            root_level = len(g.options[0].path) == 1  # the command's own options
            target = self if root_level else self.add_argument_group(g.title,
                                                                     g.description or None)
            for o in g.options:
                _add_option(target, o, [o.flag, *extra.get(o.dest, [])], argparse.SUPPRESS)

    def parse_config(self, argv: list[str] | None = None):
        """Parse `argv` (default sys.argv) into the root config; errors exit with status 2."""
        return self.config_from(self.parse_args(argv))

    def config_from(self, ns: argparse.Namespace):
        try:
            values = self._file_values(ns._config_file) if getattr(ns, "_config_file", None) \
                else {}
            for dest, opt in self._options.items():
                if hasattr(ns, dest):
                    value = getattr(ns, dest)
                    if opt.shape.kind == "seq":
                        value = finish(value, opt.shape, opt.flag)
                    _set(values, opt.path, value)
            missing = [o.flag for o in self._options.values()
                       if o.required and not _has(values, o.path)]
            if missing:
                raise ConfigError(f"the following arguments are required: {', '.join(missing)}")
            return build(self.root, values)
        except (ValueError, TypeError) as e:
            self.error(str(e))

    def _file_values(self, path: str) -> dict:
        data = load_file(path)
        values: dict = {}

        def walk(table: Mapping, prefix: tuple[str, ...]) -> None:
            sections = _sections_at(self._options, prefix)
            for key, value in table.items():
                at = (*prefix, key)
                opt = self._options.get(".".join(at))
                if opt is not None:
                    _set(values, at, from_file_value(value, opt.shape, opt.split, opt.dest))
                elif key in sections and isinstance(value, Mapping):
                    walk(value, at)
                else:
                    known = sorted(o.path[-1] for o in self._options.values()
                                   if o.path[:-1] == prefix) + [f"[{s}]" for s in sections]
                    where = f"[{'.'.join(prefix)}]" if prefix else "the top level"
                    raise ConfigError(f"{path}: unknown key {'.'.join(at)!r}; {where} has: "
                                      f"{', '.join(known)}")

        walk(data, ())
        return values


def _sections_at(options: Mapping[str, _Option], prefix: tuple[str, ...]) -> list[str]:
    n = len(prefix)
    return sorted({o.path[n] for o in options.values()
                   if o.path[:n] == prefix and len(o.path) > n + 1})


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    return True


# ---- flat form ---------------------------------------------------------------------------
def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str | None = None,
                       prefix: str = "") -> argparse.ArgumentParser:
    """Add `--[prefix-]field-name` options for the fields of `cls` (real defaults)."""
    target = parser.add_argument_group(group or cls.__name__)
    for g in _groups(cls, None, (), f"{prefix}-" if prefix else "", frozenset(), ""):
        for o in g.options:
            if len(o.path) != 1:
                continue  # nested sections need ConfigParser
            opt = dataclasses.replace(o, path=(f"{prefix}_{o.path[0]}" if prefix
                                               else o.path[0],))
            _add_option(target, opt, [opt.flag], opt.default)
    return parser


def from_args(cls: type, ns: argparse.Namespace, prefix: str = ""):
    """`cls` from options added by `add_dataclass_args` (absent ones keep defaults)."""
    kwargs = {}
    for g in _groups(cls, None, (), "", frozenset(), ""):
        for o in g.options:
            dest = f"{prefix}_{o.path[0]}" if prefix else o.path[0]
            if len(o.path) == 1 and hasattr(ns, dest):
                value = getattr(ns, dest)
                if o.shape.kind == "seq" and isinstance(value, list):
                    value = finish(value, o.shape, o.flag)
                kwargs[o.path[0]] = value
    return cls(**kwargs)

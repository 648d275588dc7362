"""The ``odyssey`` command: a thin dispatcher over subcommands.

Each subcommand is a module with ``main(argv: list[str]) -> int`` that parses its own
arguments. To add one, write the module and add one line to :data:`COMMANDS`; its
module docstring's first line becomes its summary in ``odyssey --help``. Modules are
imported only when their command runs, so a slow or broken one cannot slow down or
break the others.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, str] = {
    "run": "launch.run:main",
    "inject": "launch.inject:main",
    "status": "launch.status:main",
    "replay": "launch.replay_trace:main",
    "plan": "planner.cli:plan_main",
    "profile": "profiler.cli:profile_main",
    "bench": "launch.bench:main",
    "simulate": "launch.simulate:main",
    "plan-serve": "planner.serving.cli:plan_serve_main",
    "report": "odyssey.report_plot:main",
    "store": "launch.serve_store:main",
    "prepare-data": "odyssey.prepare:main",
    "export": "launch.export:main",
}
"""Subcommand name -> ``"module:function"`` implementing it."""

_DESCRIPTION = """\
Odyssey: fault-tolerant training runtime for PyTorch.

Run `odyssey COMMAND --help` for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``odyssey`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Top-level options take no values, so the first bare word is the command; all that
    # follows belongs to the command's own parser (`odyssey run --help` included).
    split = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv) - 1)
    head, tail = argv[: split + 1], argv[split + 1 :]
    try:
        ns = parser.parse_args(head)
    except SystemExit as stop:  # --help, --version, or a usage error
        return _exit_code(stop)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = load(COMMANDS[ns.command])
    try:
        return int(command(tail) or 0)
    except SystemExit as stop:  # argparse inside the command
        return _exit_code(stop)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one subparser per registered command, for help and checks."""
    parser = argparse.ArgumentParser(
        prog="odyssey", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, target in COMMANDS.items():
        # The command parses its own arguments; this subparser only names it.
        sub.add_parser(name, help=summary(target), add_help=False)
    return parser


def load(target: str) -> Callable[[list[str]], int]:
    """Import ``"module:function"`` and return the function."""
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def summary(target: str) -> str:
    """First line of the target module's docstring, read without importing the module."""
    module_name = target.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None:
            return "(not installed)"
        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
    except (ImportError, OSError, SyntaxError) as err:
        return f"(unavailable: {err})"
    return doc.strip().splitlines()[0] if doc else ""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("odyssey-train")
    except Exception:  # not installed: running from a checkout
        return "(development checkout)"


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)  # SystemExit("message"): say it, as Python would
    return 1


def console() -> None:
    """The `odyssey` console script: `main`, then leave at once. Interpreter shutdown
    would destroy torch's store objects still held by daemon threads (a metrics exporter,
    a relay blocked in a wait), which can abort the launcher (SIGABRT, "terminate called
    without an active exception") after its summary is out."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()

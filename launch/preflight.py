"""The job's input, checked once in the launcher before any worker starts.

The launcher cannot know a training script's flags in general. A script built on
Odyssey's config tree says so with a module-level ``JOB_CONFIG_PARSER``: a function
returning its :class:`profiler.configtree.ConfigParser` (``examples/train_gpt.py`` has
one). The launcher finds the name by reading the script's source (no import), then
imports the script (so its top level must not start training: keep that under
``if __name__ == "__main__":``), parses the script's arguments with that parser and
checks what only the job as a whole can check: the plan (``--dp x --pp``, or the plan
file) against ``--nproc-per-node x --nnodes``, every fault spec's rank, the DeepSpeed
config. Each component's own checks (sizes, choices, fault steps past ``--steps``) run
as the config is built. A script without ``JOB_CONFIG_PARSER`` is not checked here; its
workers' errors are still printed once, by the launcher (odyssey/failure_report.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch import prometheus
from launch.options import LaunchOptions, UsageError
from odyssey import ds_config
from odyssey.faults import FaultSpec
from planner.plan import Plan

PARSER_NAME = "JOB_CONFIG_PARSER"
"""The module-level name a training script declares its config parser under."""


def script_source(opts: LaunchOptions) -> Path | None:
    """The file of the training script (or ``-m`` module), if it is Python we can read."""
    if opts.no_python:
        return None
    if not opts.module:
        return Path(opts.script)
    try:
        spec = importlib.util.find_spec(opts.script)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def declares_parser(path: Path) -> bool:
    """True if the module at `path` defines ``JOB_CONFIG_PARSER`` at its top level."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == PARSER_NAME for t in targets):
            return True
        if isinstance(node, ast.FunctionDef) and node.name == PARSER_NAME:
            return True
    return False


def load_parser(opts: LaunchOptions, path: Path) -> Callable[[], Any]:
    """The script's ``JOB_CONFIG_PARSER``, importing the script as a module."""
    if opts.module:
        module = importlib.import_module(opts.script)
    else:
        spec = importlib.util.spec_from_file_location("_odyssey_checked_script", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return getattr(module, PARSER_NAME)


def job_world_size(opts: LaunchOptions) -> int | None:
    """Ranks the job starts with (None for an elastic --nnodes MIN:MAX or Ray)."""
    if opts.min_nodes != opts.max_nodes:
        return None
    return opts.nproc * opts.max_nodes


def parse_script_args(parser: Any, argv: list[str]) -> Any:
    """The script's config from its arguments; a bad one raises UsageError (one line)."""
    def refuse(message: str) -> None:
        raise UsageError(f"training script arguments: {message}")

    parser.error = refuse  # argparse reports every problem through error()
    return parser.config_from(parser.parse_args(argv))


def check_config(cfg: Any, world: int | None, shape: str) -> None:
    """What only the whole job can check; UsageError names the first problem."""
    par, t = cfg.parallelism, cfg.training
    if par.plan_file:
        if not os.path.isfile(par.plan_file):
            raise UsageError(f"--plan-file {par.plan_file}: no such file")
        try:
            plan = Plan.from_json(Path(par.plan_file).read_text()).validate()
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--plan-file {par.plan_file}: not a valid plan: "
                             f"{' '.join(str(e).split())}") from None
        if world is not None and plan.ranks != list(range(world)):
            raise UsageError(f"--plan-file {par.plan_file} uses ranks {plan.ranks}, but the "
                             f"job has {world} (ranks 0..{world - 1}: {shape})")
    elif world is not None:
        dp = par.dp or world // par.pp
        if dp * par.pp != world:
            given = f"--dp {par.dp} x --pp {par.pp}" if par.dp else f"--pp {par.pp}"
            raise UsageError(f"{given} does not fit the job's {world} rank(s) ({shape}): "
                             f"need dp x pp = {world}")
    if par.partition and len(par.partition) != par.pp and not par.plan_file:
        raise UsageError(f"--partition has {len(par.partition)} stage(s) but --pp is {par.pp}")
    for text in cfg.fault_tolerance.inject:
        try:
            FaultSpec.parse(text, world)
        except ValueError as e:
            raise UsageError(f"--inject: {e}") from None
    if cfg.metrics.prometheus_addr and not prometheus.available():
        raise UsageError(f"--metrics.prometheus-addr {cfg.metrics.prometheus_addr}: the "
                         "prometheus_client package is not installed (pip install "
                         "'odyssey-train[prom]')")
    if t.ds_config:
        try:
            ds_config.apply(cfg, world or 1)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--ds-config {t.ds_config}: {' '.join(str(e).split())}") from None


def check(opts: LaunchOptions) -> bool:
    """Check the job's input if the script declares its parser; True if it was checked."""
    if any(a in ("-h", "--help") for a in opts.script_args):
        return False
    path = script_source(opts)
    if path is None or not declares_parser(path):
        return False
    try:
        parser = load_parser(opts, path)()
    except Exception as e:  # a script that cannot even be imported will not train either
        raise UsageError(f"cannot load {opts.script} to check its arguments: "
                         f"{type(e).__name__}: {e}") from None
    try:
        cfg = parse_script_args(parser, list(opts.script_args))
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # a component's own check
        raise UsageError(f"training script arguments: {' '.join(str(e).split())}") from None
    if opts.backend == "ray" and cfg.monitor.control_plane == "node":
        raise UsageError("--monitor.control-plane node needs each node's launcher beside "
                         "its workers (it reads their heartbeat files), but the Ray "
                         "backend's driver is not on the workers' nodes: use notify (the "
                         "default) with --backend ray")
    shape = f"--nproc-per-node {opts.nproc} x --nnodes {opts.max_nodes}"
    check_config(cfg, job_world_size(opts) if opts.backend != "ray" else opts.nproc, shape)
    return True

"""``odyssey run`` command line: torchrun's parser plus Odyssey's options, and validation.

The flags are torchrun's own (``torch.distributed.run.get_args_parser``), so a torchrun
command line works unchanged with ``torchrun`` replaced by ``odyssey run``. Validation
turns the parsed namespace into a :class:`LaunchOptions` or raises :class:`UsageError`
with a message meant for the user.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import textwrap
import uuid
from dataclasses import dataclass, field

from launch.ray_config import STRATEGIES, RayConfig
from odyssey import contract

DESCRIPTION = """\
Launch a training script on N worker processes, like torchrun, but keep the survivors
when a worker dies.

The launcher hosts the job's TCPStore (node 0's launcher, for multi-node jobs), so any
worker, rank 0 included, may die without taking the shared state with it. When a worker
exits, the others keep running; the exit is recorded in the store and the training
runtime decides how to recover. Any client may ask for a rank to be killed ("fenced").
The launcher ends when every worker has exited."""

EPILOG = f"""\
worker environment:
  torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
  MASTER_PORT (= the launcher's store; TORCHELASTIC_USE_AGENT_STORE=True, so
  init_process_group("gloo") just works), TORCHELASTIC_RESTART_COUNT=0, plus
  {contract.ENV_STORE_ADDR}, {contract.ENV_STORE_PORT}  the launcher-hosted TCPStore
  {contract.ENV_RUN_DIR}                     --run-dir, absolute
  {contract.ENV_LAUNCHER}=1
  {contract.ENV_HOST}    this node's address, which gloo binds: 127.0.0.1 on a single node;
                  multi-node: --local-addr, else the address routing to --rdzv-endpoint
  {contract.ENV_TOKEN}   the job token (also in RUN_DIR/{contract.TOKEN_FILE}, mode 0600)
  OMP_NUM_THREADS=1, TORCH_CPP_LOG_LEVEL=ERROR   unless already set

store keys:
  odyssey/exits/{{rank}}    launcher writes {{"rank","pid","exitcode","signal","time"}}
  odyssey/exits/count     launcher adds 1 per exit (after writing the record)
  odyssey/nodes/{{n}}/lost  set once by the watcher that declared node n lost; it also
                          writes that node's ranks' exit records ("node_lost": n)
  odyssey/fence/{{rank}}    reason signed with the job token -> launcher SIGKILLs that
                          rank (unsigned or forged values are ignored, with one log line)
  odyssey/fenced/{{rank}}   launcher writes {{"rank","time","reason"}} once it is dead
  odyssey/workers/{{rank}}  launcher writes {{"rank","pid","node","host"}} at spawn
  odyssey/job/status      training leader sets "done" on success

exit status:
  2 if the input is refused before any worker starts (a bad flag, plan, plan file, fault
  spec, size or DeepSpeed config; a run directory locked by another job), or if every
  failed worker refused its input (one line per distinct cause, tracebacks in
  RUN_DIR/logs/rank<N>.log); else 128+N if the launcher was stopped by signal N (workers
  are first asked to checkpoint and stop, see --stop-grace); else 0 if odyssey/job/status
  is "done", 1 if it holds anything else; without that key, 0 if every worker exited 0,
  else 1.

examples:
  odyssey run --standalone --nproc-per-node 4 train.py --steps 100
  odyssey run --nproc-per-node 2 -m examples.train_gpt --steps 20
  # 4 workers as Ray actors (a private local Ray instance; --ray-address auto: a cluster):
  odyssey run --backend ray --nproc-per-node 4 train.py --steps 100
  # two nodes (run on each; node ranks come from the rendezvous):
  odyssey run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
      --rdzv-endpoint node0:29400 --rdzv-id job42 train.py

See docs/launcher.md for the full contract."""

# torchrun flags that only steer torch's elastic agent, which odyssey run replaces.
_IGNORED = {
    "start_method": "workers are always spawned as fresh processes",
    "event_log_handler": "no torchelastic events are emitted",
    "log_dir": "workers inherit the launcher's stdout/stderr",
    "redirects": "workers inherit the launcher's stdout/stderr",
    "tee": "workers inherit the launcher's stdout/stderr",
    "local_ranks_filter": "workers inherit the launcher's stdout/stderr",
    "duplicate_stdout_filters": "workers inherit the launcher's stdout/stderr",
    "duplicate_stderr_filters": "workers inherit the launcher's stdout/stderr",
    "logs_specs": "workers inherit the launcher's stdout/stderr",
    "numa_binding": "not supported yet",
    "virtual_local_rank": "not supported yet",
}

_HELP_OVERRIDES = {
    "max_restarts": "Accepted for torchrun compatibility; odyssey run never restarts workers. "
    "When a worker fails the survivors keep running and the runtime recovers in place. "
    "(Plain torchrun with --max-restarts, which restarts every worker, is the baseline.)",
    "monitor_interval": "Period in seconds of the launcher loop that reaps exits and reads "
    "fence requests; it bounds how soon survivors learn of a dead worker, so odyssey run "
    "polls faster than torchrun (default: %(default)s).",
    "shutdown_timeout": "Seconds workers get after a forwarded SIGINT/SIGTERM before SIGKILL "
    "(default: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 5).",
    "signals_to_handle": "Signals the launcher forwards to the workers before shutting them "
    "down (default: %(default)s).",
    "nproc_per_node": "Number of workers on this node: an integer >= 1, or auto/cpu/gpu/xpu "
    "(default: %(default)s).",
    "run_path": "Not supported by odyssey run (workers are separate processes).",
    "standalone": "Single-node job (same as --nnodes 1 under odyssey run): the launcher "
    "hosts the store on 127.0.0.1 and no rendezvous takes place.",
    "rdzv_backend": "Rendezvous backend used to assign node ranks in multi-node jobs "
    "(c10d, static, etcd, ...; default: %(default)s). Unused for single-node jobs.",
    "master_addr": "Static multi-node rendezvous: address of node 0 (default: %(default)s). "
    "Workers' MASTER_ADDR always names the launcher-hosted store instead.",
    "local_addr": "Multi-node: this node's address, which its workers bind and advertise "
    f"({contract.ENV_HOST}) and node 0's store listens on (default: the address of the "
    "interface that routes to the rendezvous endpoint, else the host's FQDN). Give it when "
    "that route is not the network the nodes share (e.g. the endpoint is reached over a "
    "different interface than the workers should use).",
    "master_port": "Static multi-node rendezvous: port of node 0's rendezvous store "
    "(default 29500). Single node: the store port, unless --store-port is given.",
}


class UsageError(ValueError):
    """A command line that cannot be run; the message is shown to the user."""


@dataclass(frozen=True)
class LaunchOptions:
    """Everything ``odyssey run`` needs, validated."""

    cmd: list[str]
    nproc: int
    min_nodes: int
    max_nodes: int
    run_dir: str | None
    store_port: int
    poll_interval_s: float
    shutdown_timeout_s: float
    finish_grace_s: float
    node_timeout_s: float
    signals: tuple[signal.Signals, ...]
    run_id: str
    role: str
    rdzv_backend: str
    rdzv_endpoint: str
    rdzv_configs: dict[str, object] = field(default_factory=dict)
    local_addr: str | None = None
    rejoin_after_s: float | None = None
    backend: str = "torchrun"
    """``torchrun``: this launcher spawns the workers; ``ray``: actors on a Ray cluster."""
    ray: RayConfig | None = None
    """Placement of the workers under ``--backend ray``."""
    store_endpoint: str | None = None
    """``HOST:PORT`` of a store run apart from the job (``odyssey store``); None: host one."""
    token_file: str | None = None
    """File holding the job token (--token-file); None: the launcher creates one."""
    stop_grace_s: float = 60.0
    """After SIGINT/SIGTERM, how long workers get to checkpoint and stop on their own
    before the signal is forwarded (--stop-grace; 0: forward at once)."""
    job_id: str = ""
    """This job's id in the run directory's lock (--rdzv-id, else a fresh one)."""
    script: str = ""
    """The training script (a path, or a module name with ``module``)."""
    script_args: tuple[str, ...] = ()
    """The training script's own arguments (checked by launch/preflight.py)."""
    module: bool = False
    no_python: bool = False

    @property
    def multi_node(self) -> bool:
        """True when other launchers take part (a rendezvous is needed)."""
        return self.max_nodes > 1


def build_parser() -> argparse.ArgumentParser:
    """torchrun's argument parser, relabelled for ``odyssey run`` plus Odyssey's options."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "odyssey run"
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # Retitle torch's flags in place (argparse has no public API for it).
    for action in parser._actions:
        if action.dest in _HELP_OVERRIDES:
            action.help = _HELP_OVERRIDES[action.dest]
        elif action.dest in _IGNORED:
            action.help = f"Ignored by odyssey run: {_IGNORED[action.dest]}."
    parser.set_defaults(monitor_interval=0.02)
    group = parser.add_argument_group("Odyssey options")
    group.add_argument("--run-dir", default=None, metavar="DIR",
                       help="Directory for this run's files, exported to workers as "
                       f"{contract.ENV_RUN_DIR} (default: runs/<timestamp>). The launcher "
                       "writes launcher-node<N>.json there (store address, pids, exits).")
    group.add_argument("--store-port", type=int, default=None, metavar="PORT",
                       help="Port of the launcher-hosted TCPStore (node 0's, multi-node); "
                       "0 picks a free one (default: single node --master-port if given, "
                       "else 0).")
    group.add_argument("--finish-grace", type=float, default=60.0, metavar="SECONDS",
                       help="Once odyssey/job/status is set, workers still running after "
                       "this long are stopped (default: %(default)s).")
    group.add_argument("--rejoin-after", type=float, default=None, metavar="SECONDS",
                       help="Start a replacement worker this long after a worker fails; it "
                       "joins the running job, which re-plans upward and hands it state from "
                       "live peers (default: off; `odyssey inject --kind rejoin` asks for "
                       "one at any time).")
    group.add_argument("--node-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="Multi-node: each launcher bumps its node's heartbeat in the "
                       "store 4 times a second; a node whose heartbeat has not moved for "
                       "this long is declared lost (by one of the other launchers or "
                       "`odyssey store`), its ranks get 'node lost' exit records and the "
                       "survivors recover at once, as after a process death. Node 0 also "
                       "stops keeping the store up for such a node. Too small a value "
                       "declares a merely slow node lost (its workers are then killed); "
                       "at least 1 (default: %(default)s).")
    group.add_argument("--token-file", default=None, metavar="PATH",
                       help="Read the job token from PATH instead of creating a random one "
                       "(multi-node: give every launcher the same file, or none; then node "
                       "0's token reaches the others through the rendezvous store). It is "
                       f"written to <run dir>/{contract.TOKEN_FILE} (mode 0600) and "
                       f"exported to workers as {contract.ENV_TOKEN}; fences, `odyssey "
                       "inject` and replacement requests must be signed with it.")
    group.add_argument("--stop-grace", type=float, default=60.0, metavar="SECONDS",
                       help="On SIGINT/SIGTERM, ask the workers (through the store) to "
                       "finish or abort the step in flight, checkpoint the last committed "
                       "step and exit; forward the signal only if they are still running "
                       "after this long (0: forward at once, as torchrun does; a second "
                       "signal stops them at once; default: %(default)s).")
    group.add_argument("--store-endpoint", default=None, metavar="HOST:PORT",
                       help="Use the store that `odyssey store` serves there instead of "
                       "hosting one, so the store (the job's single point of failure) runs "
                       "apart from every worker; one fresh store per job (default: the "
                       "launcher, node 0's for multi-node, hosts it).")
    ray = parser.add_argument_group(
        "Ray backend", "--backend ray starts --nproc-per-node workers in total as Ray actors\n"
        "(one placement-group bundle each) instead of local processes; see docs/ray.md.")
    ray.add_argument("--backend", choices=("torchrun", "ray"), default="torchrun",
                     help="torchrun: this launcher spawns the workers (with a rendezvous "
                     "across nodes); ray: the workers are Ray actors placed by Ray "
                     "(default: %(default)s).")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster to join: 'auto' (the one `ray start` runs here) or "
                     "ray://HOST:10001 (default: start a private local instance).")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0, metavar="N",
                     help="CPUs in each worker's bundle (default: %(default)s).")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0.0, metavar="N",
                     help="GPUs in each worker's bundle (default: %(default)s).")
    ray.add_argument("--ray-strategy", choices=STRATEGIES, default="PACK",
                     help="Placement-group strategy (default: %(default)s).")
    ray.add_argument("--ray-temp-dir", default=None, metavar="DIR",
                     help="Local instance only: Ray's session directory (default: Ray's).")
    ray.add_argument("--ray-start-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="How long placing the bundles and starting the actors may take "
                     "(default: %(default)s).")
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LaunchOptions:
    """Validate parsed arguments; raises :class:`UsageError` with a readable message."""
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as err:
        raise UsageError(f"--nproc-per-node: {err}") from None
    if nproc < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    try:
        min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        raise UsageError(f"--nnodes must be N or MIN:MAX, got {args.nnodes!r}") from None
    if not 0 < min_nodes <= max_nodes:
        raise UsageError(f"--nnodes needs 0 < MIN <= MAX, got {args.nnodes!r}")
    if args.standalone and max_nodes > 1:
        raise UsageError("--standalone is for single-node jobs; drop it or use --nnodes 1")
    if args.max_restarts < 0:
        raise UsageError("--max-restarts must be >= 0")
    if args.run_path:
        raise UsageError("--run-path is not supported by odyssey run")
    if args.module and args.no_python:
        raise UsageError("--module and --no-python cannot be used together")
    _check_positive("--monitor-interval", args.monitor_interval)
    _check_positive("--finish-grace", args.finish_grace, allow_zero=True)
    _check_positive("--stop-grace", args.stop_grace, allow_zero=True)
    if args.node_timeout < 1.0:
        raise UsageError(f"--node-timeout must be >= 1 (seconds; nodes beat every 0.25 s), "
                         f"got {args.node_timeout:g}")

    cmd = _worker_command(args)
    # Single node: --master-port names the store, as under torchrun. Multi-node: it is the
    # static rendezvous's port, so the Odyssey store must not take it.
    fallback_port = (args.master_port or 0) if max_nodes == 1 else 0
    store_port = args.store_port if args.store_port is not None else fallback_port
    if not 0 <= store_port < 2**16:
        raise UsageError(f"--store-port must be in 0..65535, got {store_port}")
    try:
        rdzv_configs: dict[str, object] = dict(_parse_rendezvous_config(args.rdzv_conf))
    except ValueError as err:
        raise UsageError(f"--rdzv-conf: {err}") from None
    rdzv_configs.setdefault("timeout", 900)  # torchrun's default rendezvous timeout
    rdzv_endpoint = args.rdzv_endpoint
    if args.rdzv_backend == "static":
        rdzv_configs["rank"] = args.node_rank
        if not rdzv_endpoint:
            rdzv_endpoint = f"{args.master_addr}:{args.master_port or 29500}"
    elif max_nodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--rdzv-backend {args.rdzv_backend} needs --rdzv-endpoint HOST:PORT")

    _warn_ignored(args, parser)
    if args.max_restarts > 0:
        print(f"odyssey run: --max-restarts {args.max_restarts} has no effect: workers are "
              "never restarted, survivors keep running", file=sys.stderr)
    backend, ray = _backend(args, parser, max_nodes)
    store_endpoint = _store_endpoint(args.store_endpoint)
    if args.token_file is not None and not os.access(args.token_file, os.R_OK):
        raise UsageError(f"--token-file: cannot read {args.token_file}")
    return LaunchOptions(
        cmd=cmd, nproc=nproc, min_nodes=min_nodes, max_nodes=max_nodes,
        run_dir=args.run_dir, store_port=store_port, poll_interval_s=args.monitor_interval,
        shutdown_timeout_s=_shutdown_timeout(args.shutdown_timeout),
        finish_grace_s=args.finish_grace, node_timeout_s=args.node_timeout,
        signals=_parse_signals(args.signals_to_handle), run_id=args.rdzv_id, role=args.role,
        rdzv_backend=args.rdzv_backend, rdzv_endpoint=rdzv_endpoint,
        rdzv_configs=rdzv_configs, local_addr=args.local_addr,
        rejoin_after_s=args.rejoin_after, backend=backend, ray=ray,
        store_endpoint=store_endpoint, token_file=args.token_file,
        stop_grace_s=args.stop_grace, script=args.training_script,
        script_args=tuple(args.training_script_args), module=bool(args.module),
        no_python=bool(args.no_python),
        job_id=args.rdzv_id if args.rdzv_id != "none" else uuid.uuid4().hex[:12],
    )


def _backend(args: argparse.Namespace, parser: argparse.ArgumentParser, max_nodes: int
             ) -> tuple[str, RayConfig | None]:
    """The backend and, for ``ray``, its validated placement settings."""
    if args.backend != "ray":
        used = [f"--{k.replace('_', '-')}" for k in vars(args)
                if k.startswith("ray_") and getattr(args, k) != parser.get_default(k)]
        if used:
            raise UsageError(f"{', '.join(used)}: only with --backend ray")
        return args.backend, None
    if max_nodes > 1:
        raise UsageError("--backend ray places the workers itself: leave --nnodes at 1 and "
                         "give the total number of workers with --nproc-per-node")
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--backend ray needs the ray package: "
                         "pip install 'odyssey-train[ray]' (or 'ray>=2.9')")
    cpus, gpus = args.ray_cpus_per_worker, args.ray_gpus_per_worker
    if cpus < 0 or gpus < 0 or cpus + gpus == 0:
        raise UsageError("--ray-cpus-per-worker and --ray-gpus-per-worker must be >= 0 and "
                         "not both 0")
    _check_positive("--ray-start-timeout", args.ray_start_timeout)
    return "ray", RayConfig(address=args.ray_address, cpus_per_worker=cpus,
                            gpus_per_worker=gpus, strategy=args.ray_strategy,
                            temp_dir=args.ray_temp_dir,
                            start_timeout_s=args.ray_start_timeout)


def _store_endpoint(text: str | None) -> str | None:
    """Validate ``--store-endpoint HOST:PORT``."""
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 2**16:
        raise UsageError(f"--store-endpoint must be HOST:PORT with a port in 1..65535, "
                         f"got {text!r}")
    return f"{host.strip('[]')}:{int(port)}"


def _worker_command(args: argparse.Namespace) -> list[str]:
    """The worker command line, built the way torchrun builds it."""
    script = args.training_script
    if args.no_python:
        if shutil.which(script) is None:
            raise UsageError(f"program not found or not executable: {script}")
        return [script, *args.training_script_args]
    if not args.module and not os.path.isfile(script):
        raise UsageError(f"training script not found: {script}")
    python = os.getenv("PYTHON_EXEC", sys.executable)
    return [python, "-u", *(["-m"] if args.module else []), script, *args.training_script_args]


def _shutdown_timeout(flag: int | None) -> float:
    if flag is not None:
        value = float(flag)
    else:
        try:
            value = float(os.getenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5"))
        except ValueError:
            raise UsageError("TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a number") from None
    if value < 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {value:g}")
    return value


def _parse_signals(text: str) -> tuple[signal.Signals, ...]:
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    out = []
    for name in names:
        try:
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        except KeyError:
            raise UsageError(f"--signals-to-handle: unknown signal {name!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(f"--signals-to-handle: {name} cannot be handled")
        out.append(sig)
    return tuple(out)


def _check_positive(flag: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def _warn_ignored(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for dest, why in _IGNORED.items():
        if getattr(args, dest, None) != parser.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            print(textwrap.fill(f"odyssey run: ignoring {flag}: {why}"), file=sys.stderr)

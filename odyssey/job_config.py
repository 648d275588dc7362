"""`JobConfig`: everything a training job is told, as a tree of component configs.

Each component owns its fields, defaults, docstrings and checks (`__post_init__`). The
components that already live beside the code they configure are nested as they are
(`MonitorConfig`, `CommConfig`, `OptimizerConfig`), and `RecoveryConfig` and Chameleon's
`SwapConfig` are extended by one field each, so no field is defined twice. Training
scripts generate their flags from the tree (`profiler.configtree.ConfigParser(JobConfig,
aliases=SHORT_FLAGS)`): `--training.steps`, `--parallelism.dp`,
`--fault-tolerance.policy`, `--checkpoint.every`, ..., each also under the short name in
`SHORT_FLAGS` (`--steps`, `--dp`, ...); `--config job.toml` may set any field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from chameleon.config import SwapConfig
from odyssey.comm import CommConfig
from odyssey.faults import FaultSpec
from odyssey.monitor import MonitorConfig
from odyssey.netaddr import split_endpoint
from odyssey.optim import OptimizerConfig
from odyssey.precision import PrecisionConfig
from odyssey.progress import MODES as PROGRESS_MODES
from odyssey.token_data import DTYPES, TokenData, open_token_data
from planner.plan import SCHEDULES
from planner.recovery_config import POLICIES, RecoveryConfig
from planner.straggler import StragglerConfig
from profiler.configtree import section, verbatim

COMPUTE_MODES = ("real", "emulated")
SWAP_MODES = ("off", "auto")


@dataclass(frozen=True)
class TrainingConfig:
    """What to train: steps, batch layout, schedule, compute mode, output."""

    steps: int = 30
    """Optimizer steps to train (step ids 0..steps-1)."""
    num_microbatches: int = 8
    """Microbatches per step."""
    microbatch_size: int = 4
    """Samples per microbatch."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    mode: str = "real"
    """Compute mode reported with every figure: real (real math) or emulated (sleeps)."""
    log_every: int = 10
    """Print a progress line every N steps (leader only)."""
    run_dir: str = ""
    """Where metrics.jsonl, ledger.jsonl, report.json and checkpoints go (empty: the
    launcher's --run-dir, else runs/latest)."""
    ds_config: str = ""
    """DeepSpeed-style JSON config: its batch sizes set microbatch_size and
    num_microbatches, its optimizer section the AdamW settings (docs/deepspeed-models.md)."""

    def __post_init__(self) -> None:
        _one_of("training.mode", self.mode, COMPUTE_MODES)
        _one_of("training.schedule", self.schedule, SCHEDULES)
        for name in ("num_microbatches", "microbatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParallelismConfig:
    """How the model is laid out over the ranks at launch."""

    dp: int = 0
    """Data-parallel pipelines; 0 = world_size // pp."""
    pp: int = 1
    """Pipeline stages per pipeline."""
    partition: tuple[int, ...] = ()
    """Layers per stage (empty = even split)."""
    plan_file: str = ""
    """JSON Plan to run instead of dp/pp/partition (e.g. written by `odyssey plan`)."""

    def __post_init__(self) -> None:
        if self.dp < 0 or self.pp < 1:
            raise ValueError(f"parallelism needs dp >= 0 and pp >= 1, got dp={self.dp} "
                             f"pp={self.pp}")
        if any(n < 1 for n in self.partition):
            raise ValueError(f"parallelism.partition needs >= 1 layer per stage, got "
                             f"{self.partition}")


@dataclass(frozen=True)
class FaultToleranceConfig(RecoveryConfig):
    """How a lost rank is recovered from (the planner's RecoveryConfig), and the faults to
    inject for testing it."""

    inject: tuple[str, ...] = verbatim()
    """Faults to inject, e.g. kill:rank=1,step=6 (repeatable; fire on the first attempt
    only)."""

    def __post_init__(self) -> None:
        _parent_checks(self, FaultToleranceConfig)
        for spec in self.inject:
            FaultSpec.parse(spec)  # the syntax; ranks and steps are checked with the job
        _one_of("fault_tolerance.policy", self.policy, POLICIES)
        if self.horizon_s <= 0:
            raise ValueError(f"fault_tolerance.horizon_s must be > 0, got {self.horizon_s}")


@dataclass
class ActivationSwapConfig(SwapConfig):
    """Chameleon activation swapping (its SwapConfig) and whether the trainer turns it
    on."""

    mode: str = "off"
    """off, or auto (swap saved activations to host/disk to keep them under budget)."""

    def __post_init__(self) -> None:
        _parent_checks(self, ActivationSwapConfig)
        _one_of("swap.mode", self.mode, SWAP_MODES)
        try:  # checked whatever the mode: a typo must not wait for swapping to be on
            if self.budget_bytes() <= 0:
                raise ValueError("must be > 0")
        except ValueError as e:
            raise ValueError(f"swap.budget (--memory-budget) {self.budget!r}: {e}") from None

    def chameleon(self) -> SwapConfig:
        """The plain SwapConfig Chameleon is given."""
        return SwapConfig(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(SwapConfig)})


@dataclass(frozen=True)
class CheckpointConfig:
    """Per-layer checkpoints (the fallback when no replica of a layer survives, and what a
    torchrun restart resumes from)."""

    every: int = 0
    """Save a per-layer checkpoint every N steps (0 = never)."""
    resume: bool = True
    """Resume from the latest complete checkpoint, if there is one."""
    dir: str = ""
    """Checkpoint directory (empty: RUN_DIR/checkpoints)."""
    keep: int = 2
    """Keep the K newest complete (verified) checkpoints, deleting older ones; the newest
    verified one is never deleted (0 = keep all)."""
    at_end: bool = True
    """Also checkpoint the last committed step when the run ends (if every > 0) or is
    stopped (SIGTERM/SIGINT to `odyssey run`), so a rerun of the same command redoes
    nothing."""
    peer_copy: bool = False
    """Also send each layer's file to one rank that does not hold the layer, which keeps
    the copy in its peer directory, so losing one node's files loses no layer
    (docs/checkpoints.md)."""
    peer_dir: str = ""
    """Where each rank keeps the peer copies it receives, as PEER_DIR/rank{r} (empty:
    DIR/../peer-checkpoints). Point it at a node-local disk to put every copy on another
    machine than its layer's writer; a restart gathers copies from every node."""
    timeout_s: float = 120.0
    """How long the leader waits for every writer's files before abandoning a checkpoint
    (it then stays incomplete and is never loaded)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 0:
            raise ValueError(f"checkpoint.keep must be >= 0, got {self.keep}")
        if self.timeout_s <= 0:
            raise ValueError(f"checkpoint.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class MetricsConfig:
    """What the leader reports besides metrics.jsonl, the ledger and report.json."""

    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN_DIR/tensorboard (leader only; needs the
    tensorboard package)."""
    progress: str = "auto"
    """Progress line (leader only): auto (rewritten in place on a terminal, else a plain
    line every progress_every_s), plain (always plain lines) or off."""
    progress_every_s: float = 30.0
    """Seconds between plain progress lines."""
    prometheus_addr: str = ""
    """HOST:PORT where node 0's launcher serves Prometheus metrics of the job (step rate,
    generation, recoveries, MTTR, checkpoint age; docs/sre.md), e.g. 0.0.0.0:9400 (port 0:
    any free port, `odyssey status` shows it); empty: off. Needs the prometheus_client
    package (the `prom` extra)."""

    def __post_init__(self) -> None:
        _one_of("metrics.progress", self.progress, PROGRESS_MODES)
        if self.progress_every_s < 0:
            raise ValueError(f"metrics.progress_every_s must be >= 0, got "
                             f"{self.progress_every_s}")
        if self.prometheus_addr:
            try:
                host, port = split_endpoint(self.prometheus_addr, -1)
            except ValueError:
                host, port = "", -1
            if not host or not 0 <= port <= 65535:
                raise ValueError(f"metrics.prometheus_addr must be HOST:PORT (port 0-65535), "
                                 f"got {self.prometheus_addr!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where training samples come from and how they are loaded."""

    path: str = ""
    """Token file: flat little-endian uint16/uint32 token ids (nanoGPT/Megatron layout, as
    `odyssey prepare-data` writes); empty: the script's own (synthetic) data."""
    dtype: str = "auto"
    """Token id type: uint16, uint32, or auto (the file's .json sidecar, else uint16)."""
    val_path: str = ""
    """Separate validation token file (empty: hold out the tail of `path`)."""
    val_fraction: float = 0.05
    """Fraction of `path`'s tokens held out for validation when val_path is empty."""
    seed: int = 0
    """Shuffle seed: the window order of epoch e is a pure function of (seed, e)."""
    shuffle: bool = True
    """Shuffle windows per epoch (off: windows in file order)."""
    prefetch: int = 2
    """Steps of batches prepared ahead in a background thread, on the ranks that load
    data (first and last stages); 0 loads each batch inside the step."""

    def __post_init__(self) -> None:
        _one_of("data.dtype", self.dtype, ("auto", *DTYPES))
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")

    def open(self, seq_len: int) -> TokenData:
        """The token file's training and validation windows of `seq_len + 1` tokens."""
        if not self.path:
            raise ValueError("data.path is empty: give a token file (`odyssey prepare-data`)")
        return open_token_data(self.path, seq_len, dtype=self.dtype, val_path=self.val_path,
                               val_fraction=self.val_fraction, seed=self.seed,
                               shuffle=self.shuffle)


@dataclass(frozen=True)
class EvalConfig:
    """Validation loss on the held-out split during training."""

    every: int = 0
    """Evaluate after every N-th step (and after the last step); 0 = never."""
    microbatches: int = 8
    """Validation microbatches (of training.microbatch_size samples) per evaluation,
    shared by the pipelines; the same samples every time."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.microbatches < 1:
            raise ValueError(f"eval.microbatches must be >= 1, got {self.microbatches}")


@dataclass(frozen=True)
class JobConfig:
    """One training job: a section per component."""

    training: TrainingConfig = section(TrainingConfig)
    parallelism: ParallelismConfig = section(ParallelismConfig)
    fault_tolerance: FaultToleranceConfig = section(FaultToleranceConfig)
    monitor: MonitorConfig = section(MonitorConfig)
    straggler: StragglerConfig = section(StragglerConfig)
    comm: CommConfig = section(CommConfig, exclude=("host",))  # the launcher's address
    optimizer: OptimizerConfig = section(OptimizerConfig)
    precision: PrecisionConfig = section(PrecisionConfig)
    swap: ActivationSwapConfig = section(ActivationSwapConfig, exclude=("layers",))
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    data: DataConfig = section(DataConfig)
    eval: EvalConfig = section(EvalConfig)

    def __post_init__(self) -> None:
        steps = self.training.steps
        for text in self.fault_tolerance.inject:
            if FaultSpec.parse(text).step >= steps:
                raise ValueError(f"fault spec {text!r} would never fire: its step is past "
                                 f"the run's last step ({steps - 1}, --steps {steps})")


SHORT_FLAGS = {
    "steps": "training.steps", "num-microbatches": "training.num_microbatches",
    "microbatch-size": "training.microbatch_size", "schedule": "training.schedule",
    "mode": "training.mode", "log-every": "training.log_every",
    "run-dir": "training.run_dir", "ds-config": "training.ds_config",
    "dp": "parallelism.dp", "pp": "parallelism.pp", "partition": "parallelism.partition",
    "plan-file": "parallelism.plan_file",
    "ft-policy": "fault_tolerance.policy", "horizon-s": "fault_tolerance.horizon_s",
    "inject": "fault_tolerance.inject", "device-memory": "fault_tolerance.device_memory",
    "heartbeat-timeout-s": "monitor.heartbeat_timeout_s",
    "join-timeout-s": "monitor.join_timeout_s", "fence-timeout-s": "monitor.fence_timeout_s",
    "comm-timeout-s": "comm.timeout_s", "device": "comm.device",
    "lr": "optimizer.lr", "weight-decay": "optimizer.weight_decay",
    "lr-schedule": "optimizer.schedule", "warmup-steps": "optimizer.warmup_steps",
    "decay-steps": "optimizer.decay_steps", "min-lr-ratio": "optimizer.min_lr_ratio",
    "grad-clip": "optimizer.grad_clip", "precision": "precision.dtype",
    "swap": "swap.mode", "memory-budget": "swap.budget", "swap-min-bytes": "swap.min_swap_bytes",
    "checkpoint-every": "checkpoint.every", "resume": "checkpoint.resume",
    "tensorboard": "metrics.tensorboard", "progress": "metrics.progress",
    "progress-every-s": "metrics.progress_every_s", "prometheus-addr": "metrics.prometheus_addr",
    "data": "data.path", "val-data": "data.val_path", "prefetch": "data.prefetch",
    "eval-every": "eval.every", "eval-microbatches": "eval.microbatches",
}
"""Short flag -> field: the one alias table of the training CLIs (these are the flat
flags of earlier versions, which the README, docs, tests and benchmarks use)."""


def job_config(base: JobConfig | None = None, **short: Any) -> JobConfig:
    """A JobConfig from short names as keywords (those of SHORT_FLAGS, `_` for `-`), on
    top of `base`: `job_config(steps=12, dp=2, pp=2, inject=("kill:rank=1,step=6",))`."""
    values: dict[str, dict[str, Any]] = {}
    for name, value in short.items():
        path = SHORT_FLAGS.get(name.replace("_", "-"))
        if path is None:
            raise TypeError(f"job_config() got an unknown field {name!r} (known: "
                            f"{', '.join(sorted(k.replace('-', '_') for k in SHORT_FLAGS))})")
        part, field = path.split(".")
        values.setdefault(part, {})[field] = value
    base = base or JobConfig()
    return dataclasses.replace(base, **{part: dataclasses.replace(getattr(base, part), **kw)
                                        for part, kw in values.items()})


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _parent_checks(obj: Any, cls: type) -> None:
    """Run the checks of the config `cls` extends, should it have any."""
    check = getattr(super(cls, obj), "__post_init__", None)
    if check is not None:
        check()

"""`TrainConfig`: everything a training run is told (the training CLI is built from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """One training run."""

    steps: int = 30
    """Optimizer steps to train (step ids 0..steps-1)."""
    dp: int = 0
    """Data-parallel pipelines; 0 = world_size // pp."""
    pp: int = 1
    """Pipeline stages per pipeline."""
    num_microbatches: int = 8
    """Microbatches per step."""
    microbatch_size: int = 4
    """Samples per microbatch."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    partition: tuple[int, ...] = ()
    """Layers per stage (empty = even split)."""
    plan_file: str = ""
    """JSON Plan to run instead of dp/pp/partition (e.g. written by `odyssey plan`)."""
    mode: str = "real"
    """Compute mode reported with every figure: real (real math) or emulated (sleeps)."""
    run_dir: str = ""
    """Where metrics.jsonl, ledger.jsonl, report.json and checkpoints go (empty: the
    launcher's --run-dir, else runs/latest)."""
    log_every: int = 10
    """Print a progress line every N steps (leader only)."""
    checkpoint_every: int = 0
    """Save a per-layer checkpoint every N steps (0 = never)."""
    resume: bool = True
    """Resume from the latest complete checkpoint in run_dir, if there is one."""
    inject: tuple[str, ...] = ()
    """Faults to inject, e.g. kill:rank=1,step=6 (fire on the first attempt only)."""
    comm_timeout_s: float = 60.0
    """Last-resort timeout of one communication op."""
    ft_policy: str = "adaptive"
    """Recovery policy: adaptive, reroute, redundant, reparallelize or restart."""
    horizon_s: float = 600.0
    """Expected time to the next membership change; recovery maximises work over it."""
    heartbeat_timeout_s: float = 3.0
    """A rank whose heartbeat stalls this long is declared hung and fenced."""
    join_timeout_s: float = 6.0
    """Agreement on the next generation: how long survivors wait for a silent member (no
    exit record, not joining) before fencing it and going on without it."""
    fence_timeout_s: float = 10.0
    """How long survivors wait for a launcher to confirm it killed a fenced rank before
    going on anyway (a lost node's ranks are confirmed by its --node-timeout instead)."""
    swap: str = "off"
    """Chameleon activation swapping: off, or auto (swap saved activations to host/disk
    to keep them under --memory-budget)."""
    memory_budget: str = "6GiB"
    """Resident saved-activation bytes allowed per rank when swapping (e.g. 512MiB)."""
    swap_min_bytes: int = 64 * 1024
    """Saved tensors smaller than this are never swapped."""
    lr: float = 3e-3
    """AdamW learning rate."""
    ds_config: str = ""
    """DeepSpeed-style JSON config: its batch sizes set microbatch_size and
    num_microbatches, its optimizer section the AdamW settings (docs/deepspeed-models.md)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN_DIR/tensorboard (leader only; needs the
    tensorboard package)."""
    progress: str = "auto"
    """Progress line (leader only): auto (rewritten in place on a terminal, else a plain
    line every progress_every_s), plain (always plain lines) or off."""
    progress_every_s: float = 30.0
    """Seconds between plain progress lines."""

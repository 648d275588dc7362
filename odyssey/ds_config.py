"""Read a DeepSpeed-style JSON config into Odyssey's batch layout and optimizer.

DeepSpeed's batch triangle, `train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x DP`, maps onto Odyssey's global batch as
`microbatch_size = micro` and `num_microbatches = gradient_accumulation_steps x DP`: the
same samples per step, dealt over the same pipelines. After a failure Odyssey keeps the
global batch and spreads the same microbatches over fewer pipelines, so the mapping holds
at launch and is never re-derived. As in DeepSpeed, any two of the three sizes fix the
third; all three must agree.

The optimizer section must describe what Odyssey's engine runs (per-layer
`torch.optim.AdamW`); missing params take DeepSpeed's defaults (lr 1e-3, betas
(0.9, 0.999), weight decay 0.01 with `torch_adam`, else 0). `gradient_clipping` becomes
`optimizer.grad_clip` (the same global norm, each layer counted once); `bf16.enabled`
becomes bf16 compute; `fp16.enabled` becomes fp16 with dynamic loss scaling
(`initial_scale_power`, `loss_scale_window`) when the scaling rule is Odyssey's: halve
and skip at the first overflow (`hysteresis` 1), no static `loss_scale`, no
`min_loss_scale` above 1. Anything that would silently change the maths (a scheduler,
whose warmup counts steps differently from Odyssey's `--lr-schedule`, another optimizer,
another loss-scaling rule, an unknown key) is an error that names the key and the flag
to use instead. Keys that only affect DeepSpeed's logging are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from odyssey.engine import OptimizerConfig
from odyssey.job_config import JobConfig
from odyssey.precision import PrecisionConfig
from planner.plan import Plan

IGNORED_KEYS = frozenset({
    "steps_per_print", "wall_clock_breakdown", "dump_state", "tensorboard", "csv_monitor",
    "wandb", "comet", "comms_logger", "flops_profiler", "memory_breakdown",
    "activation_checkpointing",  # memory only; Odyssey's Chameleon swaps instead
})
"""DeepSpeed keys that do not change the numbers; accepted and not used."""
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
              "gradient_accumulation_steps")
_ADAM_PARAMS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}


class DSConfigError(ValueError):
    """A DeepSpeed config that Odyssey cannot honour exactly."""


@dataclass(frozen=True)
class DSSettings:
    """What a DeepSpeed config sets in an Odyssey run."""

    microbatch_size: int
    """train_micro_batch_size_per_gpu."""
    num_microbatches: int
    """gradient_accumulation_steps x data-parallel pipelines."""
    gradient_accumulation_steps: int
    """Microbatches per pipeline per step at launch."""
    optimizer: OptimizerConfig | None
    """AdamW settings, or None when the config has no optimizer section."""
    grad_clip: float | None = None
    """gradient_clipping (0: off; None: the config does not set it, the job's flag stands)."""
    precision: PrecisionConfig | None = None
    """bf16/fp16 compute from the config, or None (the job's own precision)."""


def load(source: str | Path | dict) -> dict:
    """A config dict from a path to a JSON file, or the dict itself."""
    if isinstance(source, dict):
        return source
    try:
        config = json.loads(Path(source).read_text())
    except OSError as e:
        raise DSConfigError(f"cannot read DeepSpeed config {source}: {e}") from None
    except json.JSONDecodeError as e:
        raise DSConfigError(f"DeepSpeed config {source} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise DSConfigError(f"DeepSpeed config {source} must be a JSON object")
    return config


def batch_layout(config: dict, dp: int) -> tuple[int, int]:
    """(micro batch size, gradient accumulation steps) for `dp` pipelines; see above."""
    vals = {k: config.get(k) for k in BATCH_KEYS}
    for k, v in vals.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise DSConfigError(f"{k} must be a positive integer, got {v!r}")
    tbs, mbs, gas = vals.values()
    if tbs is None and mbs is None:
        raise DSConfigError("the DeepSpeed config sets neither train_batch_size nor "
                            "train_micro_batch_size_per_gpu")
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * dp:
            raise DSConfigError(
                f"inconsistent batch sizes: train_batch_size {tbs} != "
                f"train_micro_batch_size_per_gpu {mbs} x gradient_accumulation_steps {gas} "
                f"x data-parallel pipelines {dp} (= {mbs * gas * dp})")
    elif tbs is not None and mbs is not None:
        gas, rem = divmod(tbs, mbs * dp)
        if rem or gas == 0:
            raise DSConfigError(
                f"train_batch_size {tbs} is not a multiple of train_micro_batch_size_per_gpu "
                f"{mbs} x data-parallel pipelines {dp} (= {mbs * dp})")
    elif tbs is not None:
        gas = gas or 1
        mbs, rem = divmod(tbs, gas * dp)
        if rem or mbs == 0:
            raise DSConfigError(
                f"train_batch_size {tbs} is not a multiple of gradient_accumulation_steps "
                f"{gas} x data-parallel pipelines {dp} (= {gas * dp})")
    else:
        gas = gas or 1
    return mbs, gas


def optimizer(config: dict) -> OptimizerConfig | None:
    """AdamW settings from the `optimizer` section (None if there is none)."""
    section = config.get("optimizer")
    if section is None:
        return None
    kind = str(section.get("type", "")).lower()
    params = dict(section.get("params", {}))
    if kind not in ("adam", "adamw"):
        raise DSConfigError(f"optimizer.type {section.get('type')!r} is not supported: "
                            "Odyssey runs AdamW (type Adam or AdamW)")
    if kind == "adam" and params.get("adam_w_mode") is False:
        raise DSConfigError("optimizer Adam with adam_w_mode=false (L2 regularised Adam) is "
                            "not supported: Odyssey runs AdamW (decoupled weight decay)")
    unknown = sorted(set(params) - _ADAM_PARAMS)
    if unknown:
        raise DSConfigError(f"optimizer.params {unknown} are not supported (known: "
                            f"{sorted(_ADAM_PARAMS)})")
    if float(params.get("eps", 1e-8)) != 1e-8:
        raise DSConfigError(f"optimizer.params.eps {params['eps']} is not supported: Odyssey's "
                            "AdamW uses eps 1e-8")
    # DeepSpeed's defaults, which depend on the implementation it would pick: torch's
    # AdamW (torch_adam) decays weights by 0.01, its FusedAdam by 0
    betas = tuple(float(b) for b in params.get("betas", (0.9, 0.999)))
    if len(betas) != 2:
        raise DSConfigError(f"optimizer.params.betas must have two values, got {betas}")
    decay = params.get("weight_decay", 0.01 if params.get("torch_adam") else 0.0)
    return OptimizerConfig(lr=float(params.get("lr", 1e-3)), betas=betas,
                           weight_decay=float(decay))


def _check_unsupported(config: dict) -> None:
    known = set(BATCH_KEYS) | {"optimizer", "zero_optimization", "fp16", "bf16",
                               "gradient_clipping", "prescale_gradients",
                               "gradient_predivide_factor"} | IGNORED_KEYS
    if "scheduler" in config:
        raise DSConfigError("a DeepSpeed scheduler is not supported (its warmup counts "
                            "steps differently): remove it and use --lr-schedule, "
                            "--warmup-steps, --min-lr-ratio (docs/recipe.md)")
    unknown = sorted(set(config) - known)
    if unknown:
        raise DSConfigError(f"DeepSpeed config keys {unknown} are not supported by Odyssey "
                            f"(supported: {sorted(known)})")
    clip = config.get("gradient_clipping", 0.0) or 0.0
    if not isinstance(clip, (int, float)) or clip < 0:
        raise DSConfigError(f"gradient_clipping must be a number >= 0, got {clip!r}")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage > 1:
        raise DSConfigError(f"zero_optimization.stage {stage}: pipeline models support "
                            "ZeRO stage 0 or 1 only (in DeepSpeed too)")
    if config.get("prescale_gradients") or config.get("gradient_predivide_factor", 1.0) != 1.0:
        raise DSConfigError("prescale_gradients / gradient_predivide_factor change the "
                            "gradient rounding and are not supported")


def precision(config: dict) -> PrecisionConfig | None:
    """bf16/fp16 compute from the `bf16`/`fp16` sections (None: neither is enabled)."""
    bf16 = (config.get("bf16") or {}).get("enabled", False)
    fp16 = config.get("fp16") or {}
    if bf16 and fp16.get("enabled", False):
        raise DSConfigError("bf16.enabled and fp16.enabled: choose one")
    if bf16:
        return PrecisionConfig("bf16")
    if not fp16.get("enabled", False):
        return None
    unknown = sorted(set(fp16) - {"enabled", "initial_scale_power", "loss_scale_window",
                                  "hysteresis", "loss_scale", "min_loss_scale", "auto_cast"})
    if unknown:
        raise DSConfigError(f"fp16 keys {unknown} are not supported")
    if fp16.get("loss_scale", 0) != 0:
        raise DSConfigError(f"fp16.loss_scale {fp16['loss_scale']}: a static loss scale is "
                            "not supported (Odyssey scales dynamically; set it to 0)")
    if fp16.get("hysteresis", 2) != 1:
        raise DSConfigError(f"fp16.hysteresis {fp16.get('hysteresis', 2)} (DeepSpeed's "
                            "default is 2): Odyssey halves the scale and skips the step at "
                            "the first overflow; set \"hysteresis\": 1 to train with that rule")
    if fp16.get("min_loss_scale", 1) > 1:
        raise DSConfigError(f"fp16.min_loss_scale {fp16['min_loss_scale']} is not supported "
                            "(Odyssey's scale has no floor above 1)")
    return PrecisionConfig("fp16", init_scale=2.0 ** fp16.get("initial_scale_power", 16),
                           growth_interval=int(fp16.get("loss_scale_window", 1000)))


def settings(source: str | Path | dict, dp: int) -> DSSettings:
    """Validate a DeepSpeed config for a job of `dp` data-parallel pipelines."""
    if dp <= 0:
        raise DSConfigError(f"data-parallel pipelines must be positive, got {dp}")
    config = load(source)
    _check_unsupported(config)
    mbs, gas = batch_layout(config, dp)
    return DSSettings(microbatch_size=mbs, num_microbatches=gas * dp,
                      gradient_accumulation_steps=gas, optimizer=optimizer(config),
                      grad_clip=(float(config["gradient_clipping"] or 0.0)
                                 if "gradient_clipping" in config else None),
                      precision=precision(config))


def apply(job: JobConfig, world_size: int) -> JobConfig:
    """`job` with the batch layout, AdamW settings, clipping and precision of its
    `training.ds_config` (they win over the flags); DP comes from the plan file,
    `parallelism.dp`, or world_size // pp."""
    par = job.parallelism
    if par.plan_file:
        dp = len(Plan.from_json(Path(par.plan_file).read_text()).pipelines)
    else:
        dp = par.dp or max(1, world_size // par.pp)
    ds = settings(job.training.ds_config, dp)
    training = dataclasses.replace(job.training, microbatch_size=ds.microbatch_size,
                                   num_microbatches=ds.num_microbatches)
    optim = job.optimizer  # the schedule, groups and eps stay the job's
    if ds.optimizer is not None:
        optim = dataclasses.replace(optim, lr=ds.optimizer.lr, betas=ds.optimizer.betas,
                                    weight_decay=ds.optimizer.weight_decay)
    if ds.grad_clip is not None:
        optim = dataclasses.replace(optim, grad_clip=ds.grad_clip)
    return dataclasses.replace(job, training=training, optimizer=optim,
                               precision=ds.precision or job.precision)

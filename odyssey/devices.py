"""Which device a worker computes on, and which communication backend goes with it.

`device` is `cpu`, `cuda` or `auto` (CUDA when this process can see a GPU, else CPU).
Under `cuda` each worker takes `cuda:LOCAL_RANK`, or the only visible GPU when a node has
fewer GPUs than workers and the backend is gloo (gloo moves CUDA tensors through host
memory, so several ranks may share one GPU: that is how the fault tests run on a one-GPU
machine). NCCL refuses two ranks of one communicator on the same GPU, so under nccl each
worker needs a GPU of its own.
"""

from __future__ import annotations

import os

import torch

DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("auto", "gloo", "nccl")

# NCCL error handling for in-place recovery: the process must survive a peer's death, so
# the watchdog may abort the communicator but never tear the process down (mode 2);
# Odyssey's monitor then builds the next generation's groups on a fresh store prefix.
NCCL_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    # the heartbeat monitor ends the process when the watchdog is stuck (e.g. in an abort
    # that hangs); Odyssey bounds the abort itself (CommConfig.abort_timeout_s)
    "TORCH_NCCL_ENABLE_MONITORING": "0",
}


class DeviceError(ValueError):
    """The requested device or backend cannot be used here (one line, for the user)."""


def resolve_device(spec: str, local_rank: int = 0, backend: str = "auto") -> torch.device:
    """The device this worker computes on; a clear `DeviceError` when it cannot."""
    if spec not in DEVICES:
        raise DeviceError(f"--device must be one of {DEVICES}, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = ("this torch build has no CUDA support (torch " + torch.__version__ + ")"
               if built is None else "no GPU is visible (CUDA_VISIBLE_DEVICES="
               + repr(os.environ.get("CUDA_VISIBLE_DEVICES")) + ")")
        raise DeviceError(f"--device cuda was asked for but {why}; use --device cpu")
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if resolve_backend(backend, torch.device("cuda")) == "nccl":
        raise DeviceError(f"local rank {local_rank} has no GPU of its own ({count} visible) "
                          "and NCCL cannot put two ranks on one GPU; start at most "
                          f"{count} workers per node or use --comm.backend gloo")
    return torch.device("cuda", local_rank % count)


def resolve_backend(spec: str, device: torch.device) -> str:
    """`auto` means nccl on CUDA and gloo on CPU; nccl on CPU is an error."""
    if spec not in BACKENDS:
        raise DeviceError(f"--comm.backend must be one of {BACKENDS}, got {spec!r}")
    if spec == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if spec == "nccl" and device.type != "cuda":
        raise DeviceError("--comm.backend nccl needs --device cuda (NCCL moves CUDA tensors "
                          "only); use gloo on CPU")
    return spec


def prepare_process(device: torch.device, backend: str) -> None:
    """Once per worker, before any group exists: pin the CUDA device, set NCCL's error
    handling so a failed peer aborts communicators instead of the process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "nccl":
        for name, value in NCCL_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)


def device_memory_bytes(device: torch.device) -> float | None:
    """Total memory the device reports (None off CUDA: the planner then has no default
    capacity, see `RecoveryConfig.capacity_bytes`)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def host_available_bytes() -> float | None:
    """The node's available host memory now (Linux MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None

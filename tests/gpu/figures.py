"""Where GPU tests leave their figures for benchmarks/gpu_check.sh to put in the docs."""

from __future__ import annotations

import json
import os
import time

import torch

FIGURES_ENV = "GPU_CHECK_FIGURES"
"""Path of a JSON-lines file; unset: figures are only printed."""


def record(name: str, **figures: object) -> None:
    """Print one test's figures and append them (with the device name) to the file."""
    line = {"check": name, "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, **figures}
    print(json.dumps(line))
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

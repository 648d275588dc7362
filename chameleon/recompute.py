"""The recompute half of the swap + recompute hybrid, limited to simple cases.

Supported: the output y of a pointwise activation (GELU, SiLU) whose autograd node saves
its input x anyway. Instead of keeping or moving y, the executor keeps a reference to
y's producer node and, when y is unpacked, reads x back from that node (through the same
saved-tensor hooks, so x may itself be swapped) and recomputes y = f(x) on the device.
Same kernel, same input, same shape: the result is bitwise identical. Anything else
(matmuls, norms, attention, chains of recomputation) is swapped or kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def saved_input(node: Any) -> torch.Tensor:
    """The input the producer node saved (goes through the saved-tensor hooks)."""
    return node._saved_self


def recompute(op: str, node: Any, x: torch.Tensor) -> torch.Tensor:
    """Recompute the output of `node` (a GeluBackward0/SiluBackward0) from its input x."""
    with torch.no_grad():
        if op == "gelu":
            return F.gelu(x, approximate=node._saved_approximate)
        if op == "silu":
            return F.silu(x)
    raise ValueError(f"cannot recompute {op!r}")

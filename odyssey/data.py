"""The sampler keyed by (step, microbatch id), and deterministic synthetic data.

Real text comes from token files (`odyssey.token_data`).

Sample ids of step k are fixed by the global batch layout alone, so whichever rank or
pipeline trains microbatch m of step k sees exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampler:
    """Maps (step, microbatch id) to global sample ids.

    Step k trains the `global_batch` ids that follow those of step k-1, starting from
    (`first_step`, `first_sample`): (0, 0) for a fresh run. A run resumed under a
    different batch layout continues from the samples already consumed (`rebase`), so
    no sample is skipped or trained twice.
    """

    num_microbatches: int
    """Microbatches per step."""
    microbatch_size: int
    """Samples per microbatch."""
    first_step: int = 0
    """The step whose first sample id is `first_sample`."""
    first_sample: int = 0
    """Samples consumed before `first_step`."""

    @property
    def global_batch(self) -> int:
        return self.num_microbatches * self.microbatch_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps before `step` (the first sample id of `step`)."""
        if step < self.first_step:
            raise ValueError(f"step {step} precedes this layout (it starts at step "
                             f"{self.first_step})")
        return self.first_sample + (step - self.first_step) * self.global_batch

    def sample_ids(self, step: int, microbatch: int) -> list[int]:
        if not 0 <= microbatch < self.num_microbatches:
            raise ValueError(f"microbatch {microbatch} outside [0, {self.num_microbatches})")
        base = self.samples_before(step) + microbatch * self.microbatch_size
        return list(range(base, base + self.microbatch_size))

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(step, microbatch) whose batch starts at or holds `sample_id`."""
        step, offset = divmod(sample_id - self.first_sample, self.global_batch)
        return self.first_step + step, offset // self.microbatch_size

    def rebase(self, step: int, samples_consumed: int) -> None:
        """Continue at `step` after `samples_consumed` samples (a resume; call it before
        any step runs: every holder of this sampler sees the change)."""
        self.first_step, self.first_sample = step, samples_consumed


@dataclass(frozen=True)
class ArithmeticTokens:
    """Token sequences x_t = (x_{t-1} + d) mod V with a per-sample stride d in 1..4.

    A model must read the context to infer d, so the loss falls from ln(V) towards 0 as it
    learns; nothing is downloaded or copied.
    """

    vocab_size: int = 64
    """Token vocabulary size."""
    seq_len: int = 32
    """Tokens per sample (inputs and targets are shifted by one)."""
    seed: int = 0
    """Data seed; sample s is a pure function of (seed, s)."""

    def batch(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for s in sample_ids:
            g = torch.Generator().manual_seed(self.seed * 1_000_000_007 + s)
            start = int(torch.randint(self.vocab_size, (1,), generator=g))
            stride = int(torch.randint(1, 5, (1,), generator=g))
            rows.append((start + stride * torch.arange(self.seq_len + 1)) % self.vocab_size)
        seq = torch.stack(rows)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


@dataclass(frozen=True)
class RandomRegression:
    """Inputs and targets of shape [dim] drawn from N(0,1), keyed by sample id.

    Used by the emulated-compute model, whose layers are tiny real linear maps.
    """

    dim: int = 16
    """Feature width."""
    seed: int = 0
    """Data seed."""

    def batch(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for s in sample_ids:
            g = torch.Generator().manual_seed(self.seed * 1_000_000_007 + s)
            xs.append(torch.randn(self.dim, generator=g))
            ys.append(torch.randn(self.dim, generator=g))
        return torch.stack(xs), torch.stack(ys)

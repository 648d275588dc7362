"""Optional TensorBoard scalars next to the JSONL metrics (leader only, `--tensorboard`).

Mirrors metrics.jsonl (loss, samples/s, step time, world size, generation, data wait and
the scalars hooks log, per step), eval.jsonl (validation loss) and each recovery (MTTR
and its phases, at the step it resumed) into RUN_DIR/tensorboard.
The JSONL files stay the source of truth; this is for people who already live in
TensorBoard. A new leader (the old one died) opens its own event file in the same
directory, purging anything past the step it starts from.
"""

from __future__ import annotations

from pathlib import Path

from odyssey import contract


def require_tensorboard() -> None:
    """Fail early, on every rank, with an actionable message."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"--tensorboard needs the tensorboard package ({e}); install "
                           "it (`pip install tensorboard`) or run without --tensorboard") from e


class TensorBoardLog:
    """Writes scalars with `torch.utils.tensorboard.SummaryWriter`, opened lazily."""

    def __init__(self, run_dir: str | Path, flush_secs: int = 5):
        require_tensorboard()
        self.dir = Path(run_dir) / contract.TENSORBOARD_DIR
        self.flush_secs = flush_secs
        self._writer = None

    def _w(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir), purge_step=step,
                                         flush_secs=self.flush_secs)
        return self._writer

    def metric(self, record: dict, scalars: dict[str, float] | None = None) -> None:
        """One metrics.jsonl record (needs 'step'); numeric fields become scalars, and so
        do `scalars` (those hooks logged)."""
        step = int(record["step"])
        w = self._w(step)
        keys = ("loss", "samples_per_s", "step_time_s", "world", "gen", "data_wait_s")
        for key in (*keys, *(scalars or {})):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                w.add_scalar(f"train/{key}", value, step)

    def eval(self, record: dict, scalars: dict[str, float] | None = None) -> None:
        """One eval.jsonl record: the validation loss (and scalars logged with it)."""
        step = int(record["step"])
        w = self._w(step)
        w.add_scalar("eval/loss", record["val_loss"], step)
        for key in scalars or {}:
            w.add_scalar(f"eval/{key}", record[key], step)

    def recovery(self, event: dict) -> None:
        """One recovery event from events.jsonl."""
        step = int(event["resume_step"])
        w = self._w(step)
        w.add_scalar("recovery/mttr_s", event["mttr_s"], step)
        for phase, seconds in event["phases"].items():
            w.add_scalar(f"recovery/{phase}_s", seconds, step)
        w.add_text("recovery/chosen", f"gen {event['generation']}: {event['cause']} of "
                   f"{event['ranks_lost'] or event['newcomers']} -> {event['chosen']} "
                   f"(MTTR {event['mttr_s'] * 1e3:.0f} ms)", step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

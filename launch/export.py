"""Export a checkpoint as one safetensors state dict (HF models: a from_pretrained dir).

    odyssey export RUN_DIR [--step N] --out DIR [--checkpoint-dir PATH]

See docs/hf-models.md for the checkpoint layout it reads and what it writes.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odyssey export",
        description="Consolidate a run's per-layer checkpoint into OUT/model.safetensors; "
                    "for a model built by odyssey.hf (RUN_DIR/hf_config.json) also "
                    "OUT/config.json, so AutoModelForCausalLM.from_pretrained(OUT) loads it.")
    p.add_argument("run_dir", help="the run directory (`odyssey run --run-dir`)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to export (default: the latest complete one)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the checkpoints are, if not RUN_DIR/checkpoints "
                        "(--checkpoint.dir of the run)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        from odyssey.hf.export import ExportError, export_run
    except ImportError as e:  # transformers/safetensors are an optional extra
        print(f"odyssey export needs the `hf` extra (pip install 'odyssey-train[hf]'): {e}",
              file=sys.stderr)
        return 2
    try:
        done = export_run(args.run_dir, args.out, args.step, args.checkpoint_dir)
    except (ExportError, ValueError, RuntimeError) as e:  # CheckpointError included
        print(f"odyssey export: {e}", file=sys.stderr)
        return 1
    kind = "Hugging Face from_pretrained directory" if done.hugging_face else "state dict"
    print(f"exported step {done.step} ({done.num_tensors} tensors) as a {kind}: {done.out}")
    return 0

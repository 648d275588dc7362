#!/usr/bin/env bash
# Every GPU check in one run (for a lent GPU machine; CI never runs it):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default runs/gpu_check)
# 1. pytest -m gpu: one GPU vs the CPU reference, 4 ranks sharing one GPU over gloo through
#    a SIGKILL, NCCL groups (1 GPU; a killed rank with 2+), Chameleon on GPU (device peak
#    drops, gradients bitwise equal, copies overlap compute), GPU state packing;
# 2. benchmarks/swap_bench.py on CUDA (3 steps per configuration);
# 3. benchmarks/gpu_report.py appends the figures, dated and with the device, to
#    docs/BENCHMARKS.md. Budget: under 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export GPU_CHECK_FIGURES="$OUT/figures.jsonl" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
rm -f "$GPU_CHECK_FIGURES"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
  echo "gpu_check: no CUDA device visible to $PY; nothing to check" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests/gpu \
    tests/odyssey/test_held_layers.py 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
timeout 150 "$PY" benchmarks/swap_bench.py --device cuda --steps 3 \
    --out "$OUT/swap_bench.json" 2>&1 | tee "$OUT/swap_bench.log"
bench_rc=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_report.py "$OUT" --tests-rc "$tests_rc" --bench-rc "$bench_rc" \
    --doc docs/BENCHMARKS.md
exit $(( tests_rc != 0 || bench_rc != 0 ))

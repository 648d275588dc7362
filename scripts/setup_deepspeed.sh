#!/usr/bin/env bash
# Install DeepSpeed (for benchmarks/engine_vs_deepspeed.py) into $VENV without touching
# its torch. Idempotent: a second run with deepspeed already importable does nothing.
#
#   VENV=.venv bash scripts/setup_deepspeed.sh          # default VENV=.venv
#
# Why it is not just `pip install -e .[deepspeed]`:
#   * deepspeed's setup.py imports torch; in pip's default isolated build environment that
#     means a fresh torch (the registry's newest, with several GB of CUDA packages). So we
#     build with --no-build-isolation against the torch already in $VENV, which needs
#     `wheel` (and setuptools) installed first.
#   * DS_BUILD_OPS=0: build no C++/CUDA ops at install time. With DS_ACCELERATOR=cpu the
#     one CPU extension the pipeline engine needs is JIT-built on first use (~20 s); set
#     TORCH_EXTENSIONS_DIR (the benchmark uses build/torch_extensions) to keep it out of ~.
#   * A constraint pins torch to the version already installed, and the result is checked.
# If $VENV does not exist yet it is created by scripts/setup.sh first (without the
# deepspeed extra, whatever EXTRAS says, for the reason above).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DS_VERSION=${DS_VERSION:-0.19.8}
TORCH_WANT=2.13.0

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ]; then
  extras=$(printf '%s' "${EXTRAS:-dev,plot}" | tr ',' '\n' | { grep -v -x deepspeed || true; } \
    | paste -sd, -)
  echo "[setup-deepspeed] $VENV missing: running scripts/setup.sh (EXTRAS=${extras:-none})"
  VENV="$VENV" EXTRAS="${extras}" WITH_DEEPSPEED=0 bash scripts/setup.sh
fi
PY="$VENV/bin/python"

have=$(DS_ACCELERATOR=cpu "$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
try:
    print(md.version("deepspeed"))
except md.PackageNotFoundError:
    pass
EOF
)
torch_now=$("$PY" -c 'import torch; print(torch.__version__)')
case "$torch_now" in
  "$TORCH_WANT"*) ;;
  *) echo "[setup-deepspeed] ERROR: $VENV has torch $torch_now, expected $TORCH_WANT" >&2; exit 1 ;;
esac

if [ "$have" = "$DS_VERSION" ]; then
  echo "[setup-deepspeed] deepspeed $have already installed in $VENV"
else
  PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
  echo "[setup-deepspeed] installing wheel, then deepspeed==$DS_VERSION (DS_BUILD_OPS=0, no build isolation)"
  "${PIP[@]}" wheel "setuptools>=64"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==${torch_now%%+*}" >"$constraints"
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -c "$constraints" "deepspeed==$DS_VERSION"
fi

# Check: torch unchanged, deepspeed imports on the CPU accelerator.
DS_ACCELERATOR=cpu "$PY" - <<EOF
import torch, deepspeed
from deepspeed.accelerator import get_accelerator
assert torch.__version__.startswith("$TORCH_WANT"), f"torch was replaced: {torch.__version__}"
acc = get_accelerator()
print(f"[setup-deepspeed] ok: deepspeed {deepspeed.__version__}, torch {torch.__version__}, "
      f"accelerator {acc.device_name()}, comm backend {acc.communication_backend_name()}")
EOF

# Build DeepSpeed's CPU comm op now (JIT, ~60-80 s cold) so the first test or benchmark
# that starts a DeepSpeed engine does not pay for it; tests and benchmarks point
# TORCH_EXTENSIONS_DIR at the same folder.
echo "[setup-deepspeed] building the CPU comm op into build/torch_extensions (cached)"
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/build/torch_extensions" "$PY" -c \
  "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null

#!/usr/bin/env bash
# Create .venv with everything the project needs. torch==2.13.0 goes in first so that
# no other torch (and no multi-GB CUDA build) is ever pulled in by a later requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,plot,ray,tensorboard,prom,hf,data}
# DeepSpeed is installed by its own script (it must build against this torch).
WITH_DEEPSPEED=${WITH_DEEPSPEED:-1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel >/dev/null
echo "[setup] installing torch==2.13.0 (CPU wheel)"
"${PIP[@]}" "torch==2.13.0"
echo "[setup] installing odyssey-train[$EXTRAS] (editable)"
"${PIP[@]}" -e ".[$EXTRAS]"
got=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
case "$got" in
  2.13.0*) echo "[setup] ok: torch $got, odyssey at $("$VENV/bin/python" -c 'import odyssey, os; print(os.path.dirname(odyssey.__file__))')" ;;
  *) echo "[setup] ERROR: torch $got was installed instead of 2.13.0" >&2; exit 1 ;;
esac
# The demo's corpus: this interpreter's standard-library sources, byte-level (~8 MB).
CORPUS=${CORPUS:-data/stdlib.bin}
if [ ! -s "$CORPUS" ]; then
  "$VENV/bin/odyssey" prepare-data --stdlib --max-mb 8 --out "$CORPUS"
fi
touch "$VENV/.installed"
if [ "$WITH_DEEPSPEED" = 1 ]; then
  VENV="$VENV" bash scripts/setup_deepspeed.sh
fi

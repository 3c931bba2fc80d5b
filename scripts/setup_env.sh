#!/usr/bin/env bash
# Creates ./.venv (once) with torch==2.13.0 and this package installed in editable mode.
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# Re-running is cheap: it reinstalls only when setup.py changed. Usage: scripts/setup_env.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-$(sha1sum setup.py | cut -c1-12)-$EXTRAS"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing torch==2.13.0 and megatron_patch[$EXTRAS] (first time takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 2> >(grep -v "is ignored" >&2)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2> >(grep -v "is ignored" >&2)
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
echo "[setup] ready: $("$VENV/bin/python" -W ignore -c 'import torch, megatron.core, megatron.energon as e; print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| energon", e.__version__)')"

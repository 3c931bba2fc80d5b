#!/usr/bin/env bash
# Wheels for a GPU node that cannot reach PyPI (air-gapped clusters; lent test machines): every
# package of this checkout's .venv that the node does not have, at the .venv's versions, built for
# the node's Python. torch, CUDA libraries and Triton are left out: the node brings its own.
#
#   python -m pip list --format=freeze > node.txt        # on the node (names alone also work)
#   bash scripts/offline_wheelhouse.sh node.txt [OUT=.whl] [PYTHON_VERSION=3.12]
#   # copy OUT to the node, then there:
#   python -m pip install --no-index --no-deps OUT/*.whl && python -m pip install --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
NODE_LIST=${1:?usage: offline_wheelhouse.sh NODE_PACKAGES.txt [OUT] [PYTHON_VERSION]}
OUT=${2:-.whl}
PYVER=${3:-3.12}
[ -x .venv/bin/python ] || { echo "no .venv: run scripts/setup_env.sh first" >&2; exit 2; }

normalise() { tr 'A-Z_.' 'a-z--'; }
have=$(sed 's/[=<> ].*//' "$NODE_LIST" | normalise | sort -u)
wanted=()
while IFS='=' read -r name _ version; do
  key=$(normalise <<< "$name")
  case "$key" in torch|triton|nvidia-*|megatron-patch|pip|setuptools|wheel|pytest*|pyflakes) continue ;; esac
  grep -qx "$key" <<< "$have" || wanted+=("$name==$version")
done < <(.venv/bin/python -m pip list --format=freeze --disable-pip-version-check)

mkdir -p "$OUT"
echo "[wheelhouse] ${#wanted[@]} packages for Python $PYVER -> $OUT"
PLATFORMS=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
failed=()
for requirement in "${wanted[@]}"; do
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$OUT" "$requirement" \
    || failed+=("$requirement")
done
du -sh "$OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "[wheelhouse] no wheel for: ${failed[*]}" >&2
  exit 1
fi

#!/usr/bin/env bash
# The README's demo command: set up (if needed), then run the pipeline on the embedded demo data.
# Everything lands in ./demo_out (override with DEMO_DIR). Runs on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
PY=.venv/bin/python
DEMO_DIR="${DEMO_DIR:-demo_out}"
mkdir -p "$DEMO_DIR"

echo "== 1/3 demo dataset (LLaVA JSON + PNGs) -> $DEMO_DIR/raw"
$PY tools/make_demo_dataset.py --output-dir "$DEMO_DIR/raw"

echo "== 2/3 convert to WebDataset shards + energon index -> $DEMO_DIR/webdataset"
$PY tools/stage2_sftdata2webdataset.py "$DEMO_DIR/raw/demo.json" --image-root "$DEMO_DIR/raw" \
    --output-dir "$DEMO_DIR/webdataset" --split 90,10 --overwrite

echo "== 3/3 inspect and validate the converted data"
$PY tools/inspect_webdataset.py "$DEMO_DIR/webdataset" --validate --show 2 \
    --html "$DEMO_DIR/samples.html"

echo
echo "Demo data ready: $DEMO_DIR/webdataset (open $DEMO_DIR/samples.html to look at samples)."
echo "Training on it comes with the trainer (train/sft_bench_TEMPLATE.sh)."

#!/usr/bin/env bash
# The README's demo command: set up (if needed), then the whole pipeline on the embedded demo data:
# make it, convert it, inspect it, train a tiny model on CPU with the launch template, evaluate it.
# Everything lands in ./demo_out (override with DEMO_DIR). Runs on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
PY=.venv/bin/python
DEMO_DIR="$(mkdir -p "${DEMO_DIR:-demo_out}" && cd "${DEMO_DIR:-demo_out}" && pwd)"
DEMO_SAMPLES="${DEMO_SAMPLES:-20000}"  # enough distinct images that the model must generalise, not memorise
DEMO_EPOCHS="${DEMO_EPOCHS:-4.5}"   # passes over the training conversations
DEMO_IMAGE_SIZE="${DEMO_IMAGE_SIZE:-56}"  # pixels per side: 28 px = one image token per side
DEMO_DESCRIBE="${DEMO_DESCRIBE:-0}"       # share of images first asked "Describe the image."
DEMO_MODEL_ARGS="${DEMO_MODEL_ARGS:-}"    # model overrides (trainer and evaluator), e.g. --vision-hidden-size 128
DEMO_TRAIN_ARGS="${DEMO_TRAIN_ARGS:-}"    # more trainer arguments, e.g. --lr-adapter 1e-3

echo "== 1/5 demo dataset (LLaVA JSON + PNGs) and a 512-token tokenizer -> $DEMO_DIR/raw"
$PY tools/make_demo_dataset.py --output-dir "$DEMO_DIR/raw" --num-samples "$DEMO_SAMPLES" \
    --image-size "$DEMO_IMAGE_SIZE" --describe "$DEMO_DESCRIBE" --tokenizer-dir "$DEMO_DIR/tokenizer"

echo "== 2/5 convert to WebDataset shards + energon index -> $DEMO_DIR/webdataset"
$PY tools/stage2_sftdata2webdataset.py "$DEMO_DIR/raw/demo.json" --image-root "$DEMO_DIR/raw" \
    --output-dir "$DEMO_DIR/webdataset" --split 90,10 --overwrite --no-progress

echo "== 3/5 inspect and validate the converted data"
$PY tools/inspect_webdataset.py "$DEMO_DIR/webdataset" --validate --show 1 \
    --html "$DEMO_DIR/samples.html"

echo "== 4/5 train the tiny model on CPU with train/sft_bench_TEMPLATE.sh (packing, seq 1024)"
# --lr-vision 3e-4: this vision tower starts from random weights; at the language model's 3e-3 its
# patch embedding drifts colour-blind (docs/BENCHMARKS.md). NUM_WORKERS=0: on 2 cores a loader
# process competes with the trainer's threads (0.16-0.17 vs 0.19-0.20 s/iteration).
rm -rf "$DEMO_DIR/run"
MODEL=tiny DATA_PATH="$DEMO_DIR/webdataset" TOKENIZER_PATH="$DEMO_DIR/tokenizer" \
SAVE_CKPT_PATH="$DEMO_DIR/run" SEQ_LEN=1024 MBS=1 GBS=2 \
EPOCHS="$DEMO_EPOCHS" STEP_MARGIN=0 LR=3e-3 MIN_LR=3e-4 \
SAVE_INTERVAL=500 NUM_WORKERS=0 GPUS_PER_NODE=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
EXTRA_ARGS="--packing --max-images-per-pack 32 --lr-vision 3e-4 --log-interval 50 --eval-interval 500 --eval-iters 5 --keep-last 2 $DEMO_MODEL_ARGS $DEMO_TRAIN_ARGS" \
    bash train/sft_bench_TEMPLATE.sh

echo "== 5/5 evaluate: greedy answers on the val split, exact match per question type"
$PY tools/evaluate_vqa.py --load "$DEMO_DIR/run" --data-path "$DEMO_DIR/webdataset" \
    --tokenizer-path "$DEMO_DIR/tokenizer" --model tiny $DEMO_MODEL_ARGS --limit 600 --json "$DEMO_DIR/accuracy.json"

echo
echo "Demo done. Checkpoints: $DEMO_DIR/run/iter_*  (latest: $(cat "$DEMO_DIR/run/latest_checkpointed_iteration.txt"))"
echo "TensorBoard: tensorboard --logdir $DEMO_DIR/run/tensorboard"
echo "Samples: $DEMO_DIR/samples.html   Accuracy: $DEMO_DIR/accuracy.json"

#!/usr/bin/env bash
# LLaVA-OneVision-1.5-4B stage-2 SFT on one node with 8 x 80 GB GPUs: TP1 PP1, seq 8192, packing.
# The template's [EDIT] block, filled in; edit the paths, then: bash examples/llava_ov_1_5/sft_4b_1node_8gpu.sh
# (any variable can still be overridden from the environment, e.g. DRY_RUN=1 to see the plan).
set -euo pipefail
export DATA_NAME="${DATA_NAME:-my_sft}"
export DATA_PATH="${DATA_PATH:-/data/my_sft_wds}"                                 # converted dataset
export CHECKPOINT_PATH="${CHECKPOINT_PATH-/models/llava-ov-1.5-4b-mcore}"         # tools/convert_hf_to_mcore.py output
export TOKENIZER_PATH="${TOKENIZER_PATH:-$CHECKPOINT_PATH}"                      # the converter copies tokenizer files there
export EXP_DIR="${EXP_DIR:-/runs}"
export MODEL="${MODEL:-llava-ov-1.5-4b}" TP="${TP:-1}" PP="${PP:-1}"
export SEQ_LEN="${SEQ_LEN:-8192}" MBS="${MBS:-1}"
export GBS="${GBS:-64}"                 # packed sequences per step (~8 per GPU)
export EPOCHS="${EPOCHS:-1}" LR="${LR:-1e-5}" MIN_LR="${MIN_LR:-1e-6}"
export NUM_WORKERS="${NUM_WORKERS:-4}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
# bf16 weights, optimizer state sharded over the 8 data-parallel ranks, recompute every layer
# (activations of an 8k sequence would not fit otherwise), TE + flash attention when installed.
export EXTRA_ARGS="${EXTRA_ARGS:---packing --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --async-save --ckpt-assume-constant-structure --manual-gc --manual-gc-interval 100 --recompute-granularity full}"
exec bash "$(dirname "$0")/../../train/sft_bench_TEMPLATE.sh"

#!/usr/bin/env bash
# LLaVA-OneVision-1.5-8B stage-2 SFT on 2 nodes x 8 x 80 GB GPUs: TP2 PP1 (DP 8), seq 8192, packing.
# Run it on every node with NNODES/NODE_RANK/MASTER_ADDR set (or under SLURM: sft_8b_2node.sbatch;
# or as a Kubeflow PyTorchJob, whose WORLD_SIZE/RANK count nodes). DRY_RUN=1 shows the plan.
set -euo pipefail
export DATA_NAME="${DATA_NAME:-my_sft}"
export DATA_PATH="${DATA_PATH:-/data/my_sft_wds}"
export CHECKPOINT_PATH="${CHECKPOINT_PATH-/models/llava-ov-1.5-8b-mcore}"
export TOKENIZER_PATH="${TOKENIZER_PATH:-$CHECKPOINT_PATH}"
export EXP_DIR="${EXP_DIR:-/shared/runs}"          # must be on storage every node sees
export MODEL="${MODEL:-llava-ov-1.5-8b}" TP="${TP:-2}" PP="${PP:-1}"
export SEQ_LEN="${SEQ_LEN:-8192}" MBS="${MBS:-1}"
export GBS="${GBS:-128}"
export EPOCHS="${EPOCHS:-1}" LR="${LR:-1e-5}" MIN_LR="${MIN_LR:-1e-6}"
export NUM_WORKERS="${NUM_WORKERS:-4}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export NNODES="${NNODES:-2}"
export EXTRA_ARGS="${EXTRA_ARGS:---packing --bf16 --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --async-save --ckpt-assume-constant-structure --manual-gc --manual-gc-interval 100 --recompute-granularity full}"
exec bash "$(dirname "$0")/../../train/sft_bench_TEMPLATE.sh"

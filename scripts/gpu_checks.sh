#!/usr/bin/env bash
# Every GPU check in one batch, for a machine with CUDA torch and this package installed
# (`pip install -e .[gpu]` after a CUDA torch): the gpu-marked tests, then the one-GPU benchmark
# of docs/BENCHMARKS.md ("GPU comparison"). Each step has its own time limit and a failing step
# does not stop the next; everything lands in $OUT (default ./gpu_results) for BENCHMARKS.md.
#   OUT=/path bash scripts/gpu_checks.sh            # all
#   STEPS="tests" bash scripts/gpu_checks.sh        # only the tests (or "bench")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
STEPS=${STEPS:-"tests bench"}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output and exit status
  local name=$1 seconds=$2; shift 2
  echo "[gpu_checks] $name (limit ${seconds}s)"
  local started=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  echo "$name exit=$status seconds=$((SECONDS - started))" | tee -a "$OUT/summary.txt"
}

{ date -u; nvidia-smi; "$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("megatron.core", "megatron.energon", "transformer_engine", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:  # noqa: BLE001 - report whatever is missing
        print(name, "missing:", type(error).__name__, error)
EOF
} > "$OUT/environment.txt" 2>&1

if [[ " $STEPS " == *" tests "* ]]; then
  step pytest_gpu 900 "$PYTHON" -m pytest -m gpu -q -rA tests
fi

if [[ " $STEPS " == *" bench "* ]]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  COMMON=(--model llava-ov-1.5-4b --num-layers 28 --hidden-size 2048 --ffn-hidden-size 6144
          --num-attention-heads 16 --num-query-groups 8 --rotary-base 1000000 --seq-length 8192
          --micro-batch-size 1 --grad-accum 8 --warmup-steps 3 --steps 10 --bf16)
  step bench_both 600 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" --trainer both \
    --json "$OUT/seq8k_both.json"
  step bench_megatron_recompute 600 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
    --trainer megatron --recompute-granularity full --json "$OUT/seq8k_megatron_recompute.json"
  step bench_megatron_sdpa 600 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
    --trainer megatron --attention-backend sdpa --json "$OUT/seq8k_megatron_sdpa.json"
fi
cat "$OUT/summary.txt" 2>/dev/null

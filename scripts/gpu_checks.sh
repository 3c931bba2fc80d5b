#!/usr/bin/env bash
# Every GPU check in one batch, sized for a short lease on one GPU (about 8 minutes in all):
# the gpu-marked tests, the packed-attention micro-benchmark, then the one-GPU benchmark of
# docs/BENCHMARKS.md ("GPU comparison", megatron trainer and the plain-PyTorch baseline in one
# run). Each step has its own time limit and a failing step does not stop the next; everything
# lands in $OUT (default ./gpu_results) for BENCHMARKS.md, and a summary is printed last.
#
# Needs CUDA torch and this package's dependencies. On a node without PyPI, build the wheels
# here with scripts/offline_wheelhouse.sh and set WHEELS to their folder: they are installed
# into a private directory first (nothing of the node's own packages is replaced).
#   OUT=/path bash scripts/gpu_checks.sh                 # tests + benchmark
#   WHEELS=.whl STEPS="tests" bash scripts/gpu_checks.sh # only the tests ("bench", "recompute",
#                                                        # "ckpt": checkpoint save stall)
#   OUT=/tmp/g ARCHIVE=/results/gpu.tgz bash ...         # also pack $OUT into one file (for
#                                                        # runners that return only a few files)
# $OUT/node_packages.txt is the node's own `pip list` (before WHEELS): the input of
# scripts/offline_wheelhouse.sh for the next time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
STEPS=${STEPS:-"tests bench"}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
"$PYTHON" -m pip list --format=freeze --disable-pip-version-check > "$OUT/node_packages.txt" 2>&1

if [ -n "${WHEELS:-}" ]; then
  # only what the node lacks: a wheel of a package it has (a stale list) would shadow its own
  # build, which its torch may depend on (numpy's ABI, say)
  mapfile -t missing < <("$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata, pathlib, re, sys
key = lambda name: re.sub(r"[-_.]+", "-", name or "").lower()
have = {key(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if key(wheel.name.split("-")[0]) not in have:
        print(wheel)
EOF
)
  echo "[gpu_checks] installing ${#missing[@]} wheels of $WHEELS (the node has the others)"
  if [ ${#missing[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_checks_site "${missing[@]}" > "$OUT/install.txt" 2>&1 \
      || { echo "installing $WHEELS failed: see $OUT/install.txt"; tail -5 "$OUT/install.txt"; }
  fi
  export PYTHONPATH=/tmp/gpu_checks_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

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
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU VISIBLE")
for name in ("megatron.core", "megatron.energon", "transformer_engine", "apex",
             "fused_weight_gradient_mlp_cuda", "flash_attn", "torch.nn.attention.varlen"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as error:  # noqa: BLE001 - report whatever is missing
        print(name, "missing:", type(error).__name__, error)
EOF
} > "$OUT/environment.txt" 2>&1
grep -E "^(torch|megatron|transformer_engine|apex|fused|flash|torch.nn)" "$OUT/environment.txt"

if [[ " $STEPS " == *" tests "* ]]; then
  step pytest_gpu 180 "$PYTHON" -m pytest -m gpu -q -rA -p no:cacheprovider tests
  tail -3 "$OUT/pytest_gpu.txt"
fi

if [[ " $STEPS " == *" bench "* ]]; then  # packed attention alone: varlen kernel vs segment loop
  step bench_attention 60 "$PYTHON" benchmarks/bench_packed_attention.py \
    --json "$OUT/packed_attention.json"
  grep -E '"(loop_ms|varlen_ms|speedup|max_abs_difference)"' "$OUT/bench_attention.txt"
fi

# the LLaVA-OV-1.5 architecture with a Qwen3-1.7B-sized language model, seq 8192, packed, bf16
COMMON=(--model llava-ov-1.5-4b --num-layers 28 --hidden-size 2048 --ffn-hidden-size 6144
        --num-attention-heads 16 --num-query-groups 8 --rotary-base 1000000 --seq-length 8192
        --micro-batch-size 1 --grad-accum 8 --warmup-steps 3 --steps 8 --bf16)
if [[ " $STEPS " == *" bench "* ]]; then
  step bench_both 300 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" --trainer both \
    --json "$OUT/seq8k_both.json"
  tail -12 "$OUT/bench_both.txt"
fi
if [[ " $STEPS " == *" recompute "* ]]; then
  step bench_recompute 240 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
    --trainer megatron --recompute-granularity full --json "$OUT/seq8k_megatron_recompute.json"
  tail -8 "$OUT/bench_recompute.txt"
fi
if [[ " $STEPS " == *" ckpt "* ]]; then  # how long a save stops training: sync vs --async-save
  step bench_checkpoint 240 "$PYTHON" benchmarks/bench_checkpoint_save.py \
    --save-dir /tmp/gpu_checks_ckpt --model llava-ov-1.5-4b --num-layers 8 --hidden-size 2048 \
    --ffn-hidden-size 6144 --num-attention-heads 16 --num-query-groups 8 --seq-length 4096 \
    --image-size-min 224 --image-size-max 672 --bf16 --use-distributed-optimizer \
    --json "$OUT/checkpoint_save.json"
  tail -5 "$OUT/bench_checkpoint.txt"
fi
cat "$OUT/summary.txt" 2>/dev/null
if [ -n "${ARCHIVE:-}" ]; then
  mkdir -p "$(dirname "$ARCHIVE")" && tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
    && echo "[gpu_checks] packed $OUT into $ARCHIVE"
fi

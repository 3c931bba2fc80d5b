#!/usr/bin/env bash
# Every GPU check in one batch, sized for a short lease on one GPU: a preflight of what the
# rest needs (CUDA, NCCL, torch.compile, the varlen flash kernel), then the steps of $STEPS in
# that order: the gpu-marked tests ("tests"), the packed-attention micro-benchmark alone
# ("attention") or with the one-GPU benchmark of docs/BENCHMARKS.md ("bench": megatron trainer
# and the plain-PyTorch baseline in one run), one profiled megatron step ("profile"), packs of
# 16384 tokens ("long"), the language layers as CUDA graphs ("graphs"), the megatron step
# without each of its fusions and the chunked loss ("levers"), the activations one layer and
# the loss keep ("memory"), full recompute ("recompute"), the checkpoint-save stall ("ckpt"),
# and the trainer's step on this node's CPU alone, at negligible widths ("host").
# Each step has its own time limit, cut to what is left of $BUDGET seconds (default 540), and
# a failing step does not stop the next (a trainer step that runs out of memory is run again
# with the norms and MLPs recomputed, and so are the trainer steps after it). Everything lands
# in $OUT (default ./gpu_results) for BENCHMARKS.md, a summary is printed last, and with
# ARCHIVE=FILE all of $OUT is packed into FILE after every step (a run killed from outside
# keeps what the finished steps wrote).
#
# Needs CUDA torch and this package's dependencies. On a node without PyPI, build the wheels
# here with scripts/offline_wheelhouse.sh and set WHEELS to their folder: the ones the node
# lacks are installed into a private directory first (none of its own packages is replaced).
#   OUT=/path bash scripts/gpu_checks.sh                 # tests + benchmark
#   WHEELS=.whl STEPS="bench tests" bash scripts/gpu_checks.sh
#   ARCHIVE=$OUT/gpu.tgz OUT=/tmp/g bash ...             # for runners that return a few files
#                                                        # from their $OUT: ARCHIVE first, as
#                                                        # bash expands left to right
# $OUT/node_packages.txt is the node's own `pip list` (before WHEELS): the input of
# scripts/offline_wheelhouse.sh for the next time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
STEPS=${STEPS:-"tests bench"}
BUDGET=${BUDGET:-540}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

pack() {  # $OUT -> $ARCHIVE (written outside $OUT, then moved: never a half-written archive);
  # without the memory snapshots (hundreds of MB: the summaries next to them come back)
  [ -n "${ARCHIVE:-}" ] || return 0
  local partial="${TMPDIR:-/tmp}/gpu_checks_archive.$$.tgz"
  mkdir -p "$(dirname "$ARCHIVE")"
  tar czf "$partial" --exclude="$(basename "$ARCHIVE")" --exclude="*.pickle" \
    -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv -f "$partial" "$ARCHIVE"
}

# every process the steps start carries this tag in its environment: what kill_our_trainers
# ends, and nothing else (not a user's own training on the same node)
export GPU_CHECKS_TAG="gpu_checks.$$"

kill_our_trainers() {
  local pid
  for pid in $(pgrep -f "train/pretrain_llava_ov.py"); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "GPU_CHECKS_TAG=$GPU_CHECKS_TAG"
    then kill -KILL "$pid" 2>/dev/null
    fi
  done
}

step() {  # step NAME SECONDS COMMAND...: runs it within what is left of $BUDGET, keeps its output
  local name=$1 seconds=$2; shift 2
  local left=$((BUDGET - SECONDS - 15))  # 15 s for the interrupt, cleanup and packing
  if [ "$left" -lt 30 ]; then
    echo "$name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$seconds" -gt "$left" ] && seconds=$left
  echo "[gpu_checks] $name (limit ${seconds}s)"
  local started=$SECONDS
  # SIGINT first: python unwinds (pytest's finally blocks stop the trainers it started in
  # sessions of their own); SIGKILL 10 s later if that hangs
  timeout -s INT -k 10 "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  kill_our_trainers  # no trainer of ours keeps the GPU
  echo "$name exit=$status seconds=$((SECONDS - started))" | tee -a "$OUT/summary.txt"
  pack
  if [ "$status" -ne 0 ] && [[ "$*" == *benchmark_throughput.py* ]] \
     && [ ${#MEMORY_FALLBACK[@]} -eq 0 ] && grep -q "CUDA out of memory" "$OUT/$name.txt"; then
    MEMORY_FALLBACK=("${RECOMPUTE_FOR_MEMORY[@]}")
    COMMON+=("${MEMORY_FALLBACK[@]}")
    echo "$name ran out of memory: run again, and every later trainer step, with" \
      "${MEMORY_FALLBACK[*]}" | tee -a "$OUT/summary.txt"
    step "${name}_recompute" "$seconds" "$@" "${MEMORY_FALLBACK[@]}"
  fi
}

# the benchmark model's peak was 88 GiB on the H200 (2026-12-04), predicted ~60 GiB now; should
# an 80 GB card still run out, the trainer step that did is run once more with the norms and
# MLPs recomputed, and so is every trainer step after it (said in the summary), so the lease
# still measures. The "recompute" step keeps its own full recompute.
RECOMPUTE_FOR_MEMORY=(--recompute-granularity selective --recompute-modules layernorm mlp)
MEMORY_FALLBACK=()

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

# what is here, and a preflight of each thing the steps rely on (one line each)
{ date -u; nvidia-smi; timeout 180 "$PYTHON" - <<'EOF'
import importlib, socket, time, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU VISIBLE")
for name in ("megatron.core", "megatron.energon", "transformer_engine", "apex",
             "fused_weight_gradient_mlp_cuda", "flash_attn", "torch.nn.attention.varlen"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as error:  # noqa: BLE001 - report whatever is missing
        print(name, "missing:", type(error).__name__, error)


def nccl_world_of_one():
    import torch.distributed as dist
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    value = torch.ones(1, device="cuda")
    dist.all_reduce(value)
    dist.destroy_process_group()
    assert value.item() == 1


def compiled_silu():
    x = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(torch.nn.functional.silu)(x),
                               torch.nn.functional.silu(x))


def varlen_forward_backward():
    from torch.nn.attention.varlen import varlen_attn
    q, k, v = (torch.randn(96, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.tensor([0, 40, 96], device="cuda", dtype=torch.int32)
    varlen_attn(q, k, v, cu, cu, 56, 56).sum().backward()
    assert torch.isfinite(q.grad).all()


def cuda_tensor():
    assert torch.ones(1, device="cuda").item() == 1


def fp32_output_gemm():  # gradient-accumulation fusion without APEX
    from megatron_patch.compat.wgrad_accumulation import fp32_output_gemm_works
    assert fp32_output_gemm_works(torch.device("cuda"), torch.bfloat16)


def compiled_rope():  # the GPU default --rope-fusion; its failure switches it off below
    from megatron_patch.compat.packed_rope import fused_rotation, rotate
    t = torch.randn(64, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(64, 1, 128, device="cuda")
    fused_rotation()(t, angles, 1.0).float().sum().backward()
    torch.testing.assert_close(fused_rotation()(t, angles, 1.0), rotate(t, angles, 1.0),
                               rtol=2e-2, atol=2e-2)


def compiled_norms():  # the GPU default (no --no-norm-fusion); its failure switches it off below
    from megatron_patch.model.norms import compiled, layer_norm, rms_norm
    x = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for function, args in ((rms_norm, (x, weight, 1e-6)), (layer_norm, (x, weight, bias, 1e-5))):
        out = compiled(function)(*args)
        out.float().sum().backward()
        torch.testing.assert_close(out, function(*args), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    # and each residual add with the norm after it (model/residual_norm.py)
    from megatron_patch.model import residual_norm
    for tokens in (300, 517):  # varying token counts, as the vision tower's
        branch, residual = (torch.randn(tokens, 1, 128, device="cuda", dtype=torch.bfloat16,
                                        requires_grad=True) for _ in range(2))
        for function, args in ((residual_norm.add_rms_norm, (None, residual, weight, 1e-6)),
                               (residual_norm.add_layer_norm,
                                (bias, residual, weight, bias, 1e-5))):
            total, out = residual_norm.compiled(function)(branch, *args)
            (total.float().sum() + out.float().sum()).backward()
            want_total, want = function(branch, *args)
            assert torch.equal(total, want_total)
            torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        assert torch.isfinite(branch.grad).all() and torch.isfinite(residual.grad).all()


def fused_qkv():  # both towers' attention input preparation; its failure: --no-rope-fusion below
    from megatron_patch.model.qkv_fusion import compiled_preparation, prepare_qkv
    for tokens, heads_per_group, norm in ((300, 2, True), (517, 1, False), (1029, 1, False)):
        mixed = torch.randn(tokens, 1, 4 * (heads_per_group + 2) * 64, device="cuda",
                            dtype=torch.bfloat16, requires_grad=True)
        angles = torch.randn(tokens, 1, 1, 64, device="cuda", requires_grad=True)
        # the language model's shape has q/k norms, the vision tower's a qkv bias
        weights = [torch.rand(64, device="cuda", dtype=torch.bfloat16) + 0.5 if norm else None
                   for _ in range(2)]
        bias = None if norm else torch.randn(mixed.shape[-1], device="cuda", dtype=torch.bfloat16)
        shape = (heads_per_group, 64, 1e-6, 1.0)
        outs = compiled_preparation(*shape)(mixed, angles, bias, *weights)
        sum(out.float().sum() for out in outs).backward()
        for got, want in zip(outs, prepare_qkv(mixed, angles, bias, *weights, eps=1e-6,
                                               heads_per_group=shape[0], head_dim=64, mscale=1.0)):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert torch.isfinite(mixed.grad).all() and torch.isfinite(angles.grad).all()


def vision_bias_gelu():  # the vision MLP's compiled bias + GELU, a GPU default; off if it fails
    from megatron_patch.compat.bias_gelu import bias_gelu, compiled_bias_gelu
    bias = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for tokens in (300, 517, 1029):  # the vision tower's token counts vary: dynamic shapes
        x = torch.randn(tokens, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = compiled_bias_gelu()(x, bias)
        out.float().sum().backward()
        torch.testing.assert_close(out, bias_gelu(x, bias), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x.grad).all() and torch.isfinite(bias.grad).all()


def chunked_loss():  # the GPU default --loss-chunk-tokens 1024; its failure switches it off below
    from megatron_patch.model.output_loss import linear_cross_entropy
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (300,), device="cuda")
    compiled = linear_cross_entropy(hidden, weight, labels, 128, compiled=True)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, linear_cross_entropy(hidden, weight, labels, 128,
                                                              compiled=False))
    assert torch.isfinite(weight.grad).all()


def embedding_rows():  # the token embedding under gradient-accumulation fusion; off if it fails
    import torch.nn.functional as F
    from megatron_patch.compat.embedding_wgrad import rows_into_main_grad
    weight = torch.nn.Parameter(torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16))
    weight.main_grad = torch.zeros(1000, 64, device="cuda")
    weight.grad_added_to_main_grad = False
    ids = torch.randint(0, 100, (4, 300), device="cuda")  # repeated rows
    upstream = torch.randn(4, 300, 64, device="cuda", dtype=torch.bfloat16)
    with rows_into_main_grad(weight):
        out = F.embedding(ids, weight)
    (out * upstream).sum().backward()
    exact = torch.zeros(1000, 64, device="cuda", dtype=torch.float64).index_add_(
        0, ids.reshape(-1), upstream.double().reshape(-1, 64))
    torch.testing.assert_close(weight.main_grad.double(), exact, rtol=1e-5, atol=1e-5)
    assert weight.grad_added_to_main_grad


def fused_bias_dropout_add():  # the vision tower's, a GPU default; switched off below if it fails
    from megatron.core.fusions.fused_bias_dropout import bias_dropout_add_fused_train
    for tokens in (300, 517, 1029):  # the vision tower's token counts vary: dynamic shapes
        x, residual = (torch.randn(tokens, 1, 64, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(2))
        bias = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = bias_dropout_add_fused_train((x, bias), residual, 0.0)
        out.float().sum().backward()
        torch.testing.assert_close(out, residual + (x + bias), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(bias.grad.float(), torch.full_like(bias.grad, tokens).float(),
                                   rtol=1e-2, atol=0)


for check in (cuda_tensor, nccl_world_of_one, compiled_silu, varlen_forward_backward,
              fp32_output_gemm, compiled_rope, compiled_norms, fused_qkv, chunked_loss,
              embedding_rows, fused_bias_dropout_add, vision_bias_gelu):
    started = time.time()
    try:
        check()
        print(f"preflight {check.__name__}: ok ({time.time() - started:.1f} s)")
    except Exception as error:  # noqa: BLE001 - one line per failure, the steps go on
        print(f"preflight {check.__name__}: FAILED {type(error).__name__}: {str(error)[:300]}")
EOF
} > "$OUT/environment.txt" 2>&1
grep -E "^(torch|megatron|transformer_engine|apex|fused|flash|preflight)" "$OUT/environment.txt"
pack

# a GPU default whose preflight failed is switched off for every step, so the others still
# measure (the failure is in environment.txt and the summary)
FALLBACKS=()
grep -qE "^preflight (compiled_rope|fused_qkv): FAILED" "$OUT/environment.txt" \
  && FALLBACKS+=(--no-rope-fusion)
grep -q "^preflight compiled_norms: FAILED" "$OUT/environment.txt" && FALLBACKS+=(--no-norm-fusion)
grep -qE "^preflight (compiled_silu|fused_bias_dropout_add|vision_bias_gelu): FAILED" \
  "$OUT/environment.txt" \
  && FALLBACKS+=(--no-bias-swiglu-fusion)
grep -q "^preflight chunked_loss: FAILED" "$OUT/environment.txt" \
  && FALLBACKS+=(--loss-chunk-tokens 0)
grep -q "^preflight embedding_rows: FAILED" "$OUT/environment.txt" \
  && FALLBACKS+=(--no-gradient-accumulation-fusion)
[ ${#FALLBACKS[@]} -gt 0 ] && echo "switched off after failed preflights: ${FALLBACKS[*]}" \
  | tee -a "$OUT/summary.txt"

# the LLaVA-OV-1.5 architecture with a Qwen3-1.7B-sized language model, seq 8192, packed, bf16
COMMON_BASE=(--model llava-ov-1.5-4b --num-layers 28 --hidden-size 2048 --ffn-hidden-size 6144
        --num-attention-heads 16 --num-query-groups 8 --rotary-base 1000000 --seq-length 8192
        --micro-batch-size 1 --grad-accum 8 --warmup-steps 3 --steps 8 --bf16 "${FALLBACKS[@]}")
COMMON=("${COMMON_BASE[@]}")
for name in $STEPS; do
  case $name in
    tests)
      step pytest_gpu 240 "$PYTHON" -m pytest -m gpu -q -rA -p no:cacheprovider tests
      tail -3 "$OUT/pytest_gpu.txt" ;;
    attention)  # packed attention alone: segment loop, varlen kernel (as packed, and with the
      # CUDA graphs' fixed segments), cuDNN's kernel; milliseconds per layer forward + backward
      # and TFLOP/s, also for other layouts (not causal, no grouped KV, the vision tower's)
      step bench_attention 90 "$PYTHON" benchmarks/bench_packed_attention.py --variants \
        --json "$OUT/packed_attention.json"
      grep -E '^attention |"([a-z_]+_difference|cudnn)"' "$OUT/bench_attention.txt" ;;
    bench)  # packed attention alone (see "attention"), then both trainers
      step bench_attention 60 "$PYTHON" benchmarks/bench_packed_attention.py \
        --json "$OUT/packed_attention.json"
      grep -E '^attention |"([a-z_]+_difference|cudnn)"' "$OUT/bench_attention.txt"
      # 2 + 5 steps: the baseline's 17.5 s steps (H200, 2026-12-04) then fit the limit
      step bench_both 300 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" --trainer both \
        --warmup-steps 2 --steps 5 --json "$OUT/seq8k_both.json"
      tail -12 "$OUT/bench_both.txt" ;;
    profile)  # one profiled megatron step of 2 micro-batches: device busy time, kernels by kind
      # (8 micro-batches made 68.6k kernels, whose post-processing alone took about a minute);
      # then one with its allocations recorded: what is alive at the memory peak, by line
      step bench_profile 200 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
        --trainer megatron --grad-accum 2 --warmup-steps 2 --steps 3 --profile-dir "$OUT" \
        --memory-dir "$OUT" --json "$OUT/seq8k_megatron_profiled.json"
      tail -8 "$OUT/bench_profile.txt"
      head -20 "$OUT/megatron_memory_peak.txt" 2>/dev/null ;;
    long)  # the same tokens per step in half as many micro-batches of twice the length: how
      # much of the step is per-micro-batch host overhead (the step was host-bound, 2026-12-04)
      step bench_long 200 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
        --trainer megatron --seq-length 16384 --grad-accum 4 --warmup-steps 2 --steps 4 \
        --json "$OUT/seq16k_megatron.json"
      tail -6 "$OUT/bench_long.txt" ;;
    graphs)  # the language layers replayed as CUDA graphs (--cuda-graph-impl local): 28 of the
      # 52 layers launch as one graph each way instead of ~150 kernels (the step was host-bound,
      # 2026-12-04): the eager step first, then the same with graphs (its warm-up steps include
      # the capture), both megatron alone with every other default as is
      step bench_eager 200 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
        --trainer megatron --warmup-steps 3 --steps 4 --json "$OUT/seq8k_megatron_eager.json"
      tail -6 "$OUT/bench_eager.txt"
      step bench_graphs 200 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
        --trainer megatron --warmup-steps 3 --steps 4 --cuda-graph-impl local \
        --json "$OUT/seq8k_megatron_graphs.json"
      tail -6 "$OUT/bench_graphs.txt"
      # then profiled as "profile" is: device busy time, kernels and host syncs with graphs
      step bench_graphs_profile 150 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
        --trainer megatron --grad-accum 2 --warmup-steps 2 --steps 2 --cuda-graph-impl local \
        --profile-dir "$OUT/graphs" --json "$OUT/seq8k_megatron_graphs_profiled.json"
      tail -8 "$OUT/bench_graphs_profile.txt" ;;
    levers)  # the megatron step with one of its defaults off at a time, then with cuDNN's
      # packed attention instead of flash, then with the norms and MLPs recomputed (the H100
      # fit); "bench" (defaults) is the reference: what each costs or saves in time and memory
      for lever in "no_wgrad_fusion:--no-gradient-accumulation-fusion" \
                   "no_rope_fusion:--no-rope-fusion" "no_norm_fusion:--no-norm-fusion" \
                   "megatron_loss:--loss-chunk-tokens 0" \
                   "cudnn_attention:--packed-attention-kernel cudnn" \
                   "recompute_mlp:--recompute-granularity selective --recompute-modules layernorm mlp"; do
        name=${lever%%:*}
        # shellcheck disable=SC2086  # the flags split into words on purpose
        step "bench_$name" 120 "$PYTHON" tools/benchmark_throughput.py "${COMMON[@]}" \
          --trainer megatron --warmup-steps 2 --steps 3 ${lever#*:} \
          --json "$OUT/seq8k_megatron_$name.json"
        tail -4 "$OUT/bench_$name.txt"
      done ;;
    memory)  # what one layer and the loss keep for the backward at seq 8192, largest tensors
      # with the line that saved them (the 8192-token step peaked at 88 GiB, 2026-12-04), and
      # the whole benchmark model at the end of its forward (the CPU's count: 59.8 GiB)
      step activation_memory 120 "$PYTHON" benchmarks/bench_activation_memory.py \
        --model llava-ov-1.5-4b --num-layers 1 --vision-num-layers 1 --hidden-size 2048 \
        --ffn-hidden-size 6144 --num-attention-heads 16 --num-query-groups 8 --seq-length 8192 \
        --bf16 --image-size-min 224 --image-size-max 672 --top 20 "${FALLBACKS[@]}" \
        --estimate-for-depth 28 24 --json "$OUT/activation_memory.json"
      tail -24 "$OUT/activation_memory.txt" ;;
    recompute)
      step bench_recompute 240 "$PYTHON" tools/benchmark_throughput.py "${COMMON_BASE[@]}" \
        --trainer megatron --recompute-granularity full --json "$OUT/seq8k_megatron_recompute.json"
      tail -8 "$OUT/bench_recompute.txt" ;;
    host)  # no GPU: the trainer's step with the GPU's code paths on this node's CPU at
      # negligible widths (benchmarks/bench_host_time.py), to set beside the same figure on the
      # CPU of docs/BENCHMARKS.md: how fast this host runs the step's Python
      step bench_host 200 "$PYTHON" benchmarks/bench_host_time.py --steps 3 "${FALLBACKS[@]}" \
        --json "$OUT/host_time.json"
      tail -4 "$OUT/bench_host.txt" ;;
    ckpt)  # how long a save stops training: sync vs --async-save vs a reused save plan
      step bench_checkpoint 240 "$PYTHON" benchmarks/bench_checkpoint_save.py \
        --save-dir /tmp/gpu_checks_ckpt --model llava-ov-1.5-4b --num-layers 8 --hidden-size 2048 \
        --ffn-hidden-size 6144 --num-attention-heads 16 --num-query-groups 8 --seq-length 4096 \
        --image-size-min 224 --image-size-max 672 --bf16 --use-distributed-optimizer --saves 3 \
        --json "$OUT/checkpoint_save.json"
      tail -6 "$OUT/bench_checkpoint.txt" ;;
    *) echo "unknown step $name (the steps are listed at the top of scripts/gpu_checks.sh)" \
         | tee -a "$OUT/summary.txt" ;;
  esac
done
cat "$OUT/summary.txt" 2>/dev/null
pack && [ -n "${ARCHIVE:-}" ] && echo "[gpu_checks] packed $OUT into $ARCHIVE"
exit 0

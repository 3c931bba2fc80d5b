#!/usr/bin/env bash
# LLaVA-OneVision-1.5 stage-2 SFT launcher.
#   cp train/sft_bench_TEMPLATE.sh train/train_my_dataset.sh
#   edit the [EDIT] block below, then:  bash train/train_my_dataset.sh
# Every variable can also come from the environment (VAR=value bash train/...), for sweeps.
# DRY_RUN=1 prints the plan and the exact torchrun command without running anything.
set -euo pipefail

# ============================== [EDIT] ==============================
EXP_DIR="${EXP_DIR:-$PWD/runs}"                 # parent folder of all runs
DATA_NAME="${DATA_NAME:-my_dataset}"            # short name, used in the run folder's name
SAVE_CKPT_PATH="${SAVE_CKPT_PATH:-$EXP_DIR/stage2_sft_${DATA_NAME}_$(date +%m%d)}"  # checkpoints, logs, tensorboard
DATA_PATH="${DATA_PATH:-/data/${DATA_NAME}_wds}"  # output of tools/stage2_sftdata2webdataset.py, or a blend .yaml
CHECKPOINT_PATH="${CHECKPOINT_PATH:-}"          # weights to start from: tools/convert_hf_to_mcore.py output or an earlier stage's run dir (weights only); empty = random init
TOKENIZER_PATH="${TOKENIZER_PATH:-/models/LLaVA-OneVision-1.5-4B-Instruct}"  # dir with tokenizer.json
MODEL="${MODEL:-llava-ov-1.5-4b}"               # tiny | llava-ov-1.5-4b | llava-ov-1.5-8b
TP="${TP:-1}"                                   # tensor parallel: 1 for 4B on 80 GB GPUs, 2 for 8B at long seq (with TP > 1 add --sequence-parallel to EXTRA_ARGS)
PP="${PP:-1}"                                   # pipeline parallel: raise only when TP alone does not fit
SEQ_LEN="${SEQ_LEN:-8192}"                      # tokens per sequence (text + image tokens); 8192 is common
MBS="${MBS:-1}"                                 # micro batch per GPU; with packing keep 1
GBS="${GBS:-0}"                                 # global batch (samples per step); 0 = GBS_PER_DP x data-parallel size
GBS_PER_DP="${GBS_PER_DP:-4}"                   # used when GBS=0
EPOCHS="${EPOCHS:-1}"                           # passes over the train split
GPUS_PER_NODE="${GPUS_PER_NODE:-auto}"          # auto = every GPU nvidia-smi lists; no GPU = CPU processes
LR="${LR:-1e-5}"                                # peak learning rate (anchor recipe: 1e-5, cosine to MIN_LR)
MIN_LR="${MIN_LR:-1e-6}"
SAVE_INTERVAL="${SAVE_INTERVAL:-0}"             # steps between checkpoints; 0 = about 10 per run (--async-save in EXTRA_ARGS writes them while training goes on)
NUM_WORKERS="${NUM_WORKERS:-4}"                 # data loader processes per GPU
EXTRA_ARGS="${EXTRA_ARGS:-}"                    # anything else for the trainer, e.g. "--packing --bf16"
# ====================================================================

STEP_MARGIN="${STEP_MARGIN:-0.05}"              # NSTEP = ceil(samples x epochs / (GBS x samples per sequence)) x (1 + margin)
SAMPLES_PER_SEQUENCE="${SAMPLES_PER_SEQUENCE:-auto}"  # with --packing: auto = estimated from the first 1000 train samples
WARMUP_FRACTION="${WARMUP_FRACTION:-0.002}"     # share of NSTEP spent warming the lr up (0.002: the published recipe's)
CPU_PROCESSES_DP="${CPU_PROCESSES_DP:-1}"       # without a GPU: processes = TP x PP x this
RESUME="${RESUME:-auto}"                        # auto: resume from SAVE_CKPT_PATH when it has a checkpoint; 0: refuse to reuse it
MASTER_PORT="${MASTER_PORT:-29500}"
EXIT_SIGNALS="${EXIT_SIGNALS:-SIGTERM SIGINT SIGUSR1}"  # each: finish the step, save, exit 15 (SLURM: --signal=USR1@300)
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-900}"     # seconds torchrun waits for that save before SIGKILL
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -f "$REPO_DIR/train/pretrain_llava_ov.py" ] || { echo "PREFLIGHT FAILED: keep this script in the repository's train/ folder (cp train/sft_bench_TEMPLATE.sh train/my_run.sh): it finds the trainer from there" >&2; exit 1; }
PYTHON="${PYTHON:-$( [ -x "$REPO_DIR/.venv/bin/python" ] && echo "$REPO_DIR/.venv/bin/python" || echo python3)}"

fail() { echo "PREFLIGHT FAILED: $*" >&2; exit 1; }

# ---- nodes: from SLURM, else from a job whose WORLD_SIZE/RANK count nodes (a Kubeflow
# PyTorchJob: one pod per node), unless NNODES says otherwise; NODE_RANK/MASTER_ADDR as given win
if [ -n "${SLURM_NNODES:-}" ] && [ "${NNODES:-$SLURM_NNODES}" = "$SLURM_NNODES" ]; then
  NNODES="$SLURM_NNODES"; NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
  if [ -z "${MASTER_ADDR:-}" ] && [ "$NNODES" -gt 1 ]; then
    command -v scontrol >/dev/null || fail "a $NNODES-node SLURM job, but no scontrol here to find the first node (inside a container?): set MASTER_ADDR to its hostname (e.g. in the sbatch file: export MASTER_ADDR=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1))"
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | head -n1)
    [ -n "$MASTER_ADDR" ] || fail "scontrol names no host for SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}': set MASTER_ADDR to the first node's hostname"
  fi
elif [ -n "${WORLD_SIZE:-}" ] && [ -n "${RANK:-}" ] && [ "${NNODES:-$WORLD_SIZE}" = "$WORLD_SIZE" ]; then
  NNODES="$WORLD_SIZE"; NODE_RANK="${NODE_RANK:-$RANK}"
fi
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"; MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"

# ---- devices: GPUs when present, otherwise CPU processes with gloo
if [ "$GPUS_PER_NODE" = "auto" ]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
fi
if [ "${GPUS_PER_NODE:-0}" -gt 0 ]; then
  DEVICE="cuda"; PROCS_PER_NODE="$GPUS_PER_NODE"
else
  DEVICE="cpu"; PROCS_PER_NODE=$((TP * PP * CPU_PROCESSES_DP))
fi
WORLD=$((PROCS_PER_NODE * NNODES))

# ---- preflight: every failure is one line with the fix
[ -e "$DATA_PATH" ] || fail "DATA_PATH $DATA_PATH does not exist (convert with tools/stage2_sftdata2webdataset.py)"
if [ -d "$DATA_PATH" ]; then
  [ -d "$DATA_PATH/.nv-meta" ] || fail "DATA_PATH $DATA_PATH has no .nv-meta index (convert it first, or run energon prepare)"
  ls "$DATA_PATH"/*.tar >/dev/null 2>&1 || fail "DATA_PATH $DATA_PATH has an index but no .tar shards beside it"
fi
[ -e "$TOKENIZER_PATH" ] || fail "TOKENIZER_PATH $TOKENIZER_PATH does not exist (a dir with tokenizer.json)"
[ -z "$CHECKPOINT_PATH" ] || [ -e "$CHECKPOINT_PATH" ] || fail "CHECKPOINT_PATH $CHECKPOINT_PATH does not exist (empty it to start from random weights)"
if [ -n "$CHECKPOINT_PATH" ] && [ -f "$CHECKPOINT_PATH/config.json" ] && ls "$CHECKPOINT_PATH"/*.safetensors >/dev/null 2>&1 \
    && ! ls -d "$CHECKPOINT_PATH"/iter_* >/dev/null 2>&1; then
  fail "CHECKPOINT_PATH $CHECKPOINT_PATH is a Hugging Face model folder: convert it first (python tools/convert_hf_to_mcore.py --hf-dir $CHECKPOINT_PATH --out <a new folder>) and give that folder"
fi
# absolute, so that the resume hint works from any directory
case "$SAVE_CKPT_PATH" in /*) ;; *) SAVE_CKPT_PATH="$PWD/$SAVE_CKPT_PATH" ;; esac
[ ! -e "$SAVE_CKPT_PATH" ] || [ -d "$SAVE_CKPT_PATH" ] || fail "SAVE_CKPT_PATH $SAVE_CKPT_PATH is a file, not a folder: choose another path"
WRITABLE="$SAVE_CKPT_PATH"; while [ ! -e "$WRITABLE" ]; do WRITABLE=$(dirname "$WRITABLE"); done
[ -w "$WRITABLE" ] || fail "SAVE_CKPT_PATH $SAVE_CKPT_PATH: $WRITABLE is not writable for $(id -un): choose a folder you can write to"
[ $((WORLD % (TP * PP))) -eq 0 ] || fail "TP x PP = $((TP * PP)) does not divide the $WORLD processes; pick TP and PP whose product divides $WORLD"
"$PYTHON" -W ignore -m megatron_patch.training.preflight --model "$MODEL" --tp "$TP" --pp "$PP" \
    --save "$SAVE_CKPT_PATH" || fail "see the line above"

# ---- plan: GBS, NSTEP, warmup, save interval (python does the arithmetic, tested)
PLAN="$("$PYTHON" -W ignore -m megatron_patch.training.run_plan --data-path "$DATA_PATH" \
    --world-size "$WORLD" --tp "$TP" --pp "$PP" --mbs "$MBS" --gbs "$GBS" --gbs-per-dp "$GBS_PER_DP" \
    --epochs "$EPOCHS" --margin "$STEP_MARGIN" --save-interval "$SAVE_INTERVAL" \
    --warmup-fraction "$WARMUP_FRACTION" --samples-per-sequence "$SAMPLES_PER_SEQUENCE" --tokenizer-path "$TOKENIZER_PATH" \
    --trainer-args="--seq-length $SEQ_LEN $EXTRA_ARGS" --extra-args="$EXTRA_ARGS")" || fail "$(echo "$PLAN" | sed -n 's/^PLAN_ERROR=//p')"
plan_value() { echo "$PLAN" | sed -n "s/^$1=//p" | head -n1; }
DP=$(plan_value DP); GBS=$(plan_value GBS); NSTEP=$(plan_value NSTEP); SAMPLES=$(plan_value SAMPLES)
WARMUP=$(plan_value WARMUP); SAVE_INTERVAL=$(plan_value SAVE_INTERVAL); GRAD_ACC=$(plan_value GRAD_ACC)
SAMPLES_PER_SEQUENCE=$(plan_value SAMPLES_PER_SEQUENCE)

# ---- resume or fresh start
LOAD_ARGS=()
# the iteration of the newest complete checkpoint in SAVE_CKPT_PATH (empty if none), as the trainer
# chooses it: a run killed between publishing a checkpoint and updating the tracker file still
# resumes from that checkpoint
newest_checkpoint() {
  "$PYTHON" -W ignore -c 'import sys
from megatron_patch.training.checkpoint_paths import complete_iterations
done = complete_iterations(sys.argv[1])
print(done[-1] if done else "")' "$SAVE_CKPT_PATH"
}
# the NSTEP and WARMUP the run in SAVE_CKPT_PATH was planned with (its newest checkpoint's
# run_state.json): a resumed run keeps its learning-rate schedule, so it keeps its length too
saved_plan() {
  "$PYTHON" -W ignore -c 'import json, os, sys
from megatron_patch.training.checkpoint_paths import complete_iterations, iteration_dir_name
done = complete_iterations(sys.argv[1])
path = os.path.join(sys.argv[1], iteration_dir_name(done[-1]), "run_state.json") if done else ""
args = json.load(open(path)).get("args", {}) if os.path.isfile(path) else {}
print(args.get("train_iters") or "-", args.get("lr_warmup_iters") or 0)' "$SAVE_CKPT_PATH"
}
DONE_ITERS=$(newest_checkpoint)
if [ -n "$DONE_ITERS" ]; then
  [ "$RESUME" = "0" ] && fail "$SAVE_CKPT_PATH already holds a run; set RESUME=auto to continue it or choose a new SAVE_CKPT_PATH"
  read -r SAVED_NSTEP SAVED_WARMUP <<< "$(saved_plan)"
  if [ "$SAVED_NSTEP" != "-" ] && [ "$SAVED_NSTEP" != "$NSTEP" ]; then  # "-": not recorded
    echo "note: resuming keeps the run's own NSTEP=$SAVED_NSTEP (this plan gives $NSTEP: the data, EPOCHS, GBS, SEQ_LEN or packing changed)," \
         "as it keeps its learning-rate schedule; to train with the new plan, start a new stage:" \
         "CHECKPOINT_PATH=$SAVE_CKPT_PATH SAVE_CKPT_PATH=<a new folder>"
    NSTEP=$SAVED_NSTEP; WARMUP=$SAVED_WARMUP
  fi
  if [ "$DONE_ITERS" -ge "$NSTEP" ]; then
    echo "$SAVE_CKPT_PATH already finished: iteration $DONE_ITERS of NSTEP=$NSTEP. Nothing to do." \
         "To train this model further, start a new stage from it (a resumed run keeps the" \
         "learning-rate schedule it was saved with, decayed by now):" \
         "CHECKPOINT_PATH=$SAVE_CKPT_PATH SAVE_CKPT_PATH=<a new folder>"
    exit 0
  fi
  START="resuming from $SAVE_CKPT_PATH (iteration $DONE_ITERS)"
  LOAD_ARGS=(--load "$SAVE_CKPT_PATH")
elif [ -n "$CHECKPOINT_PATH" ]; then
  # --finetune: a previous stage's run lends its weights only (not its iteration, optimizer or
  # data position); a converted base model has nothing else to lend anyway
  START="fresh run from the weights in $CHECKPOINT_PATH"; LOAD_ARGS=(--load "$CHECKPOINT_PATH" --finetune)
else
  START="fresh run from random weights"
fi

LOG="$SAVE_CKPT_PATH/run_$(date +%Y%m%d_%H%M%S)_tp${TP}_pp${PP}_gbs${GBS}_${NSTEP}steps.log"
CMD=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$PROCS_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     --signals-to-handle "$(echo "SIGTERM SIGINT SIGQUIT $EXIT_SIGNALS" | tr ' ' '\n' | sort -u | paste -sd,)"
     --shutdown-timeout "$SHUTDOWN_TIMEOUT"
     "$REPO_DIR/train/pretrain_llava_ov.py"
     --model "$MODEL" --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
     --seq-length "$SEQ_LEN" --micro-batch-size "$MBS" --global-batch-size "$GBS"
     --train-iters "$NSTEP" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
     --lr-warmup-iters "$WARMUP" --data-path "$DATA_PATH" --tokenizer-path "$TOKENIZER_PATH"
     --num-workers "$NUM_WORKERS" --save "$SAVE_CKPT_PATH" --save-interval "$SAVE_INTERVAL"
     --exit-signals $EXIT_SIGNALS
     "${LOAD_ARGS[@]}")
# shellcheck disable=SC2206
CMD+=($EXTRA_ARGS)

echo "== plan ($DEVICE, $NNODES node(s) x $PROCS_PER_NODE process(es))"
echo "$PLAN" | sed -n 's/^PLAN_NOTE=/note: /p'
cat <<PLAN_EOF
WORLD_SIZE=$WORLD
TP=$TP
PP=$PP
DP=$DP
MBS=$MBS
GBS=$GBS
GRAD_ACC=$GRAD_ACC
SAMPLES=$SAMPLES
SAMPLES_PER_SEQUENCE=$SAMPLES_PER_SEQUENCE
NSTEP=$NSTEP
WARMUP=$WARMUP
SAVE_INTERVAL=$SAVE_INTERVAL
(SAMPLES counts converted conversations in the train split, GBS sequences per step, each holding ~$SAMPLES_PER_SEQUENCE conversations; NSTEP = ceil(SAMPLES x $EPOCHS / (GBS x $SAMPLES_PER_SEQUENCE)) x (1 + $STEP_MARGIN))
START: $START
LOG=$LOG
TENSORBOARD: tensorboard --logdir $SAVE_CKPT_PATH/tensorboard
PLAN_EOF
echo "COMMAND: $(printf '%q ' "${CMD[@]}")"
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "DRY_RUN=1: nothing launched"; exit 0
fi

mkdir -p "$SAVE_CKPT_PATH"
export PATH="$(dirname "$PYTHON"):$PATH"
[ "$DEVICE" = "cpu" ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# CPU processes on a GPU node (GPUS_PER_NODE=0): hide the GPUs, or the trainer would pick NCCL
# and put every process on a GPU
[ "$DEVICE" = "cpu" ] && export CUDA_VISIBLE_DEVICES=""
# fewer allocator retries and less fragmentation with varying packed lengths
[ "$DEVICE" = "cuda" ] && export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# one hardware queue per GPU: megatron's tensor-parallel linears queue the input-gradient
# all-reduce before the weight-gradient GEMM and rely on this to overlap them (Megatron-LM's
# scripts set it too)
[ "$DEVICE" = "cuda" ] && export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# A stop signal usually reaches every process of the job at once (Ctrl-C, `kill -- -PGID`, SLURM's
# --signal): this script and the log's tee stay up while the trainers finish the step and save,
# or the save would fail writing to a closed pipe and this summary would never print. Sent to
# this script alone (`docker stop`, a Kubernetes pod whose first process this is), it is passed
# on to the trainers (a repeat within seconds is the same stop to them). SIGHUP (a dropped ssh
# session) is ignored by this script, torchrun and the trainers: the run goes on.
SIGNALLED=""; LAUNCHER=""
pass_on() {  # the trainers are torchrun's children; without pgrep, torchrun relays it
  SIGNALLED="SIG$1"
  [ -n "$LAUNCHER" ] || return 0
  local trainers
  trainers=$(pgrep -P "$LAUNCHER" 2>/dev/null || true)
  # shellcheck disable=SC2086
  kill -"$1" ${trainers:-$LAUNCHER} 2>/dev/null || true
}
for SIG in TERM INT USR1; do trap "pass_on $SIG" "$SIG"; done
trap '' HUP
exec 3> >(trap '' TERM INT USR1 HUP; exec tee -a "$LOG")
TEE=$!
"${CMD[@]}" >&3 2>&1 &
LAUNCHER=$!
STATUS=""
set +e
while [ -z "$STATUS" ]; do
  wait "$LAUNCHER"; CODE=$?
  kill -0 "$LAUNCHER" 2>/dev/null || STATUS=$CODE  # still running: a trapped signal ended the wait
done
set -e
exec 3>&-
for _ in $(seq 100); do kill -0 "$TEE" 2>/dev/null || break; sleep 0.1; done  # the log is complete
AFTER=$(newest_checkpoint)
[ -n "$AFTER" ] && printf "final checkpoint: %s/iter_%07d\n" "$SAVE_CKPT_PATH" "$AFTER"
echo "log: $LOG"
# torchrun reports a signal as a failure (status 1, a SignalException traceback) even when the
# trainers saved and exited 15 as asked: what counts is whether the trainer stopped after a step
# on a signal (sent to this script, the job, or torchrun alone) and its checkpoint of that step
# is the newest published one (not an earlier interval's)
STOP_LINE=$(grep -oE "stopping at iteration [0-9]+: (received SIG[A-Z0-9]+|the launcher \(torchrun\) ended)" "$LOG" | tail -n1 || true)
STOPPED_AT=$(echo "$STOP_LINE" | sed -n 's/stopping at iteration \([0-9]*\): .*/\1/p')
STOPPED_BY="${SIGNALLED:-$(echo "$STOP_LINE" | sed 's/^[^:]*: //; s/^received //')}"
if [ -n "$STOPPED_BY" ]; then
  if [ -n "$AFTER" ] && [ "$AFTER" = "$STOPPED_AT" ]; then
    echo "stopped by $STOPPED_BY after saving iteration $AFTER; to resume, rerun the same command with SAVE_CKPT_PATH=$SAVE_CKPT_PATH"
    exit 15
  fi
  echo "stopped by $STOPPED_BY without saving the step it stopped at (see the log above)"
fi
# torchrun ends the output with its own traceback: repeat the cause last. A rank killed from
# outside (SIGKILL: the out-of-memory killer) says nothing itself; torchrun's "Root Cause" names
# it. Otherwise the trainers' first error, passing over the others' lost connections to it.
if [ "$STATUS" -ne 0 ]; then
  KILLED=$(awk '/Root Cause/ {found = 1} found && /^ *rank *:/ {rank = $3}
                found && /traceback *: Signal/ {sub(/.*traceback *: /, ""); print "rank " rank ": " $0; exit}' "$LOG")
  ERRORS=$(grep -oE "rank [0-9]+ failed: .*|^error: .*" "$LOG" || true)
  FIRST_ERROR=$(echo "$ERRORS" | grep -vE "Connection (reset|closed)|Broken pipe|peer" | head -n1 || true)
  if [ -n "$KILLED" ]; then
    echo "first error: $KILLED (killed from outside: out of memory? see dmesg or the scheduler's log)"
  elif [ -n "${FIRST_ERROR:-$ERRORS}" ]; then
    echo "first error (the log has the rest): $(echo "${FIRST_ERROR:-$ERRORS}" | head -n1)"
  fi
fi
# torchrun's rendezvous could not listen on the port: a rerun would fail the same way
if [ "$STATUS" -ne 0 ] && grep -q "port: $MASTER_PORT, .*EADDRINUSE" "$LOG"; then
  echo "port $MASTER_PORT is in use on this node (another job?): rerun with MASTER_PORT set to a free port, e.g. MASTER_PORT=$((29500 + RANDOM % 20000))"
  exit "$STATUS"
fi
# the default SAVE_CKPT_PATH holds today's date: a rerun tomorrow would start afresh elsewhere
if [ "$STATUS" -eq 0 ] && [ -n "$AFTER" ] && [ "$AFTER" -lt "$NSTEP" ]; then
  echo "not finished: stopped at iteration $AFTER of NSTEP=$NSTEP (--exit-interval or --exit-duration-in-mins); to continue, rerun the same command with SAVE_CKPT_PATH=$SAVE_CKPT_PATH"
elif [ "$STATUS" -ne 0 ] && [ -n "$AFTER" ]; then
  echo "to resume, rerun the same command with SAVE_CKPT_PATH=$SAVE_CKPT_PATH (unless the error above says the checkpoint cannot serve it)"
elif [ "$STATUS" -ne 0 ]; then
  echo "no checkpoint was saved: fix the error above and rerun"
fi
exit "$STATUS"

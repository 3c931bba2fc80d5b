"""Command-line arguments of the trainer, with Megatron-LM's names so users' habits carry over.

`validate_args` turns every invalid combination into one clear message before any heavy work
(model build, data loading): a 4B model takes minutes to build, and a typo should not cost that.
"""
import argparse
import json
import os
import tempfile
from typing import Optional, Sequence

from megatron_patch.training import checkpoint_paths
from megatron_patch.training.signals import signal_from_name


MIN_BAD_SAMPLES_TO_STOP = 10  # a single bad sample early in a run is not yet a "share"
# config values every model-building command can override (Megatron-LM names)
MODEL_SIZE_OPTIONS = ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads",
                      "num-query-groups", "vision-num-layers", "vision-hidden-size")
MODEL_OVERRIDE_KEYS = (*(name.replace("-", "_") for name in MODEL_SIZE_OPTIONS), "rotary_base",
                       "init_method_std")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_override_arguments(group, help_suffix: str = "override the config's value") -> None:
    """--num-layers ... --vision-hidden-size and --rotary-base: the trainer, the evaluator and
    the benchmark must build the same model from the same flags."""
    for name in MODEL_SIZE_OPTIONS:
        group.add_argument(f"--{name}", type=int, help=help_suffix)
    group.add_argument("--rotary-base", type=float,
                       help="RoPE base of the language model (default: the config's; pass the "
                            "checkpoint's rope_theta when it differs)")
    group.add_argument("--init-method-std", type=float,
                       help="std of the random init of weight matrices (default: the config's; "
                            "only weights trained from scratch see it)")


# the kernel switches (megatron_patch/training/kernels.py), shared by the trainer and the benchmark
KERNEL_SWITCH_KEYS = ("bias_swiglu_fusion", "rope_fusion", "norm_fusion",
                      "cross_entropy_loss_fusion", "gradient_accumulation_fusion",
                      "loss_chunk_tokens", "cuda_graph_impl", "packed_attention_kernel")
DEFAULT_GRAPH_SAMPLES_PER_PACK = 63  # + the trailing padding: 64 segments per captured pack


def add_kernel_arguments(group) -> None:
    """The fused-kernel switches, Megatron-LM's names; the benchmark takes the same ones, so a
    throughput figure can be measured with and without each."""
    group.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion",
                       action="store_false",
                       help="use the unfused SwiGLU and the vision tower's unfused "
                            "bias-dropout-add and bias + GELU (the fused ones are used with "
                            "CUDA)")
    group.add_argument("--no-rope-fusion", dest="rope_fusion", action="store_false",
                       help="rotate queries and keys with megatron's unfused elementwise RoPE "
                            "instead of compiled kernels, and prepare them without the fused "
                            "query/key/value kernel (both used with CUDA; e.g. where "
                            "torch.compile fails)")
    group.add_argument("--no-norm-fusion", dest="norm_fusion", action="store_false",
                       help="run the decoder layers' RMSNorm/LayerNorm with torch's kernels "
                            "instead of compiled ones (which also take the residual add before "
                            "them), the language model's q/k norms outside the fused "
                            "query/key/value kernel (used with CUDA; e.g. where torch.compile "
                            "fails)")
    group.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction,
                       help="megatron's fused vocab-parallel cross entropy; default: on with "
                            "--bf16 on CUDA (it rounds the logits' gradient to bf16, which the "
                            "unfused path does too for bf16 logits; in fp32 it would lose "
                            "precision)")
    group.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction,
                       help="weight gradients accumulate straight into the fp32 gradient buffer "
                            "(Megatron-LM's default); default: on with CUDA (APEX's kernel "
                            "where installed, torch's fp32-output GEMM otherwise)")
    group.add_argument("--loss-chunk-tokens", type=int, metavar="N",
                       help="compute the output layer and the cross entropy together, N tokens "
                            "at a time, so the [tokens, vocab] logits and their fp32 softmax "
                            "never exist whole (at seq 8192 with Qwen3's 152k vocabulary the "
                            "softmax alone is 4.6 GiB), for one more output-layer GEMM over the "
                            "tokens in the loss, the only ones computed; 0: megatron's "
                            "output layer, then its cross entropy. Default: 1024 with CUDA, 0 "
                            "on the CPU")
    group.add_argument("--packed-attention-kernel", choices=("flash", "cudnn"), default="flash",
                       help="the GPU kernel of packed bf16 attention without Transformer Engine: "
                            "torch's varlen flash kernel (FlashAttention-2's generation) or "
                            "torch's cuDNN attention over the same segments (on Hopper of "
                            "FlashAttention-3's); the CPU runs one SDPA call per sample either "
                            "way")
    group.add_argument("--cuda-graph-impl", choices=("none", "local"), default="none",
                       help="local: megatron-core captures each language decoder layer's "
                            "forward and backward as CUDA graphs after the first iteration and "
                            "replays them, one launch per layer instead of ~150 kernels (the "
                            "host-bound GPU step, docs/BENCHMARKS.md). Needs a GPU, --packing "
                            "(fixed shapes) and no full recompute; the vision tower stays eager "
                            "(its shapes follow the images). Packs then hold at most "
                            f"--max-samples-per-pack samples (default "
                            f"{DEFAULT_GRAPH_SAMPLES_PER_PACK})")


def _cuda_available() -> bool:
    import torch  # here: parsing arguments should not wait for torch's import
    return torch.cuda.is_available()


def model_overrides(args) -> dict:
    """The override values from any namespace built with add_model_override_arguments."""
    return {key: getattr(args, key, None) for key in MODEL_OVERRIDE_KEYS}


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


def add_recompute_arguments(g) -> None:
    """Megatron-LM's activation recompute flags (the trainer's and the benchmark's)."""
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES,
                   help="with --recompute-granularity selective: what each layer recomputes in "
                        "the backward instead of keeping (Megatron-LM's flag; default core_attn). "
                        "mlp: the MLP's activations, the most per layer, for one more MLP "
                        "forward; layernorm: the norms' outputs, for one more norm. Both towers")


def default_packing_buffer_size(seq_length: int) -> int:
    """About 30 sequences' worth of samples, at least 64 (docs/BENCHMARKS.md, packing)."""
    return max(64, seq_length // 32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LLaVA-OneVision-1.5 SFT on megatron-core",
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="config name: tiny, llava-ov-1.5-4b, llava-ov-1.5-8b")
    add_model_override_arguments(g)
    g.add_argument("--attention-backend", choices=("auto", "te", "sdpa"), default="auto")
    add_kernel_arguments(g)
    add_recompute_arguments(g)

    g = p.add_argument_group("parallelism and batch")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1: split the language model's norms, residuals and stored "
                        "activations over the TP ranks along the sequence (Megatron-LM's flag; "
                        "same communication volume as plain TP, activations / TP). Needs "
                        "--seq-length divisible by TP; ignored at TP 1, as in Megatron-LM")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, help="default: micro batch x data parallel")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="all-reduce gradient buckets during the backward pass of the last micro "
                        "batch instead of after it")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather the updated parameters "
                        "during the next forward pass, bucket by bucket, instead of right after "
                        "the optimizer step")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights and activations, fp32 master weights in the optimizer (on "
                        "CPU it runs too, slowly: the tests use it to cover the GPU recipe)")

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--optimizer", choices=("adam", "sgd", "muon"), default="adam")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-vision", type=float, help="learning rate of the vision tower (default --lr)")
    g.add_argument("--lr-adapter", type=float, help="learning rate of the adapter (default --lr)")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    warmup = g.add_mutually_exclusive_group()
    warmup.add_argument("--lr-warmup-fraction", type=float)
    warmup.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.99)
    g.add_argument("--adam-eps", type=float, default=1e-5)
    g.add_argument("--trainable-modules", nargs="+",
                   choices=("vision_model", "adapter", "language_model"),
                   default=["vision_model", "adapter", "language_model"])
    g.add_argument("--max-consecutive-skips", type=int, default=10,
                   help="stop after this many steps in a row skipped for a NaN/inf grad norm")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", required=True,
                   help="a converted dir (with .nv-meta) or an energon metadataset yaml")
    g.add_argument("--tokenizer-path", required=True)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--packing", action="store_true", help="pack several samples per sequence")
    g.add_argument("--max-images-per-pack", type=int, default=32,
                   help="packs take samples while their images stay within this (the vision "
                        "tower's memory); a sample with more images gets a pack of its own")
    g.add_argument("--max-samples-per-pack", type=int, metavar="N",
                   help="at most N samples per packed sequence (default: no limit; "
                        f"{DEFAULT_GRAPH_SAMPLES_PER_PACK} with --cuda-graph-impl local)")
    g.add_argument("--packing-buffer-size", type=int,
                   help="samples each loader worker buffers to choose packs from (default: "
                        "seq-length / 32, at least 64: about 30 sequences' worth, 98%% packing "
                        "efficiency on long-tailed SFT lengths at 8192; docs/BENCHMARKS.md). "
                        "Each buffered sample holds its decoded image patches in memory")
    g.add_argument("--min-pixels", type=int, default=4 * 28 * 28)
    g.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    g.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="samples longer than --seq-length: drop them (counted) or truncate")
    g.add_argument("--shuffle-buffer-size", type=int, default=100)
    g.add_argument("--max-bad-sample-fraction", type=float, default=0.01,
                   help="stop when more than this share of the samples read do not decode "
                        "(corrupt image, broken JSON; each is skipped with a warning); checked "
                        f"once at least {MIN_BAD_SAMPLES_TO_STOP} were seen")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--load", help="a run dir (reads latest_checkpointed_iteration.txt) or one iter_* dir")
    g.add_argument("--save", help="run dir for iter_XXXXXXX checkpoints")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints")
    g.add_argument("--finetune", action="store_true",
                   help="take only the weights from --load (a previous stage's run or a base "
                        "model) and start at iteration 0 with a fresh optimizer, schedule and "
                        "data order, as Megatron-LM's --finetune")
    g.add_argument("--no-load-optim", dest="finetune", action="store_true",
                   help="same as --finetune here: without the optimizer state there is no exact "
                        "resume, so the run starts at iteration 0")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="with --use-distributed-optimizer: save the optimizer state per parameter "
                        "(gathered over data parallel ranks) so a resume may change TP/PP; the "
                        "default keeps megatron's per-rank buffers (faster save, same TP/PP only). "
                        "While saving, each GPU rank holds 12 bytes per parameter / (TP x PP) in "
                        "host memory")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process: training continues once the "
                        "state is copied to host memory, and the checkpoint is published when "
                        "every rank has written its part (a run that dies before keeps the "
                        "previous one)")
    g.add_argument("--ckpt-fully-parallel-save", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="data-parallel replicas split the writing of the tensors they share "
                        "(Megatron-LM's default); --no-ckpt-fully-parallel-save leaves it all to "
                        "the first replica")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   help="saves after the first skip megatron's sharding check and reuse its "
                        "save plan and split of the writes instead of redoing them "
                        "(collectives over all ranks, seconds per save at thousands of ranks); "
                        "as Megatron-LM's flag")
    g.add_argument("--dataloader-save", help="also mirror the loader state here (default SAVE/dataloader)")
    g.add_argument("--eval-interval", type=int,
                   help="every N iterations (and at the end), the mean loss per assistant token "
                        "on the dataset's val split, to TensorBoard (eval/loss) and the log")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches of the val split per evaluation, from its start; "
                        "enough to cover the split scores all of it (the last batch may be "
                        "partial)")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", help="default: SAVE/tensorboard")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="after this many minutes, finish the step, save and exit with status 0 "
                        "(as Megatron-LM; rerunning the same command continues the run)")
    g.add_argument("--exit-interval", type=int,
                   help="at every multiple of this iteration, save and exit with status 0 (as "
                        "Megatron-LM); the template's summary says the run is not finished and "
                        "how to continue it")
    g.add_argument("--exit-signals", nargs="+", default=["SIGTERM", "SIGINT"],
                   help="signals that make the run finish its step, save and exit with status 15 "
                        "(add SIGUSR1 for SLURM's --signal=USR1@<seconds> warning)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective waiting longer than this fails (a dead or stuck rank "
                        "ends the job instead of hanging it)")
    g.add_argument("--record-memory-history", action="store_true",
                   help="record each rank's CUDA allocations and write them once, after the "
                        "first iteration or at an out-of-memory error: the allocator snapshot "
                        "(for pytorch.org/memory_viz) and what was alive at the peak, by "
                        "source line (Megatron-LM's flag; GPU only)")
    g.add_argument("--memory-snapshot-path",
                   help="where --record-memory-history writes, one file per rank "
                        "(default: SAVE/memory_snapshot.pickle -> memory_snapshot_rankR.pickle)")
    # fault injection for tests and drills: the loss of this iteration becomes NaN
    g.add_argument("--debug-nan-at-iteration", type=int, help=argparse.SUPPRESS)

    g = p.add_argument_group("garbage collection")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collector off and collect at the same "
                        "iterations on every rank, so no rank pauses at its own moment while the "
                        "others wait for it (Megatron-LM's flag; time/gc_sec in the logs shows "
                        "what the collector costs)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every N iterations (0: not during training; "
                        "reference counting still frees all garbage that is not a cycle)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: do not collect before and after each evaluation")
    return p


class ArgumentError(SystemExit):
    """An invalid setting; the message says what to change."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def validate_args(args: argparse.Namespace, world_size: int, model_config=None, *,
                  check_paths: bool = True) -> argparse.Namespace:
    """Checks and completes `args` in place (derived: data_parallel_size, global batch, warmup).
    The benchmark turns off the path checks (synthetic data)."""
    for flag in ("train_iters", "micro_batch_size", "global_batch_size", "log_interval",
                 "eval_iters"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:  # 0 failed later with a bare assertion or a division
            raise ArgumentError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
                            "choose TP and PP whose product divides the number of processes")
    args.data_parallel_size = world_size // (tp * pp)
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"global batch {args.global_batch_size} is not divisible by micro batch x data parallel "
            f"= {args.micro_batch_size} x {args.data_parallel_size}; use a multiple of {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    args.sequence_parallel = args.sequence_parallel and tp > 1
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--sequence-parallel splits each sequence over the {tp} TP ranks; "
                            f"--seq-length {args.seq_length} is not divisible by {tp}, use a "
                            "multiple of it")
    if model_config is not None:
        check_model_divisibility(model_config, tp, pp)
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * (args.lr_decay_iters or args.train_iters))
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"warmup ({args.lr_warmup_iters} iterations) must be shorter than the "
                            f"decay ({args.lr_decay_iters} iterations, --lr-decay-iters or "
                            "--train-iters); lower --lr-warmup-iters/--lr-warmup-fraction")
    if check_paths:
        _check_paths(args)
    if args.save and args.tensorboard_dir is None:
        args.tensorboard_dir = os.path.join(args.save, "tensorboard")
    if args.save and args.dataloader_save is None:
        args.dataloader_save = os.path.join(args.save, "dataloader")
    if args.packing_buffer_size is None:
        args.packing_buffer_size = default_packing_buffer_size(args.seq_length)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgumentError("--overlap-param-gather overlaps the distributed optimizer's parameter "
                            "all-gather; add --use-distributed-optimizer or drop the flag")
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        raise ArgumentError("--dist-ckpt-optim-fully-reshardable chooses how the distributed "
                            "optimizer saves its state; add --use-distributed-optimizer or drop "
                            "the flag (the plain optimizer's state is always reshardable)")
    if args.manual_gc_interval < 0:
        raise ArgumentError(f"--manual-gc-interval {args.manual_gc_interval} is negative; use 0 "
                            "(no collection during training) or a number of iterations")
    if args.record_memory_history and not _cuda_available():
        raise ArgumentError("--record-memory-history records the CUDA allocator, and this "
                            "machine has no GPU; drop the flag")
    if args.record_memory_history and not (args.memory_snapshot_path or args.save):
        raise ArgumentError("--record-memory-history needs --memory-snapshot-path or --save "
                            "to write to")
    if args.loss_chunk_tokens is not None and args.loss_chunk_tokens < 0:
        raise ArgumentError(f"--loss-chunk-tokens {args.loss_chunk_tokens} is negative; use 0 "
                            "(megatron's output layer and cross entropy) or a number of tokens")
    if args.recompute_modules and args.recompute_granularity != "selective":
        raise ArgumentError("--recompute-modules chooses what selective recompute repeats; add "
                            "--recompute-granularity selective")
    _check_cuda_graphs(args)
    for module, flag in (("vision_model", "lr_vision"), ("adapter", "lr_adapter")):
        if getattr(args, flag, None) is not None and module not in args.trainable_modules:
            raise ArgumentError(f"--{flag.replace('_', '-')} sets the learning rate of the "
                                f"{module}, which --trainable-modules leaves frozen; add "
                                f"{module} to --trainable-modules or drop the flag")
    if args.keep_last is not None and args.keep_last < 1:
        raise ArgumentError(f"--keep-last {args.keep_last} must be at least 1 (the newest "
                            "checkpoint is always kept); leave it out to keep every checkpoint")
    if args.packing and args.micro_batch_size != 1:
        raise ArgumentError("--packing puts several samples into one sequence per micro batch; "
                            "use --micro-batch-size 1 (raise --seq-length to fit more samples)")
    return args


def _check_cuda_graphs(args: argparse.Namespace) -> None:
    """--cuda-graph-impl local and the fixed shapes it needs; completes --max-samples-per-pack."""
    if args.max_samples_per_pack is not None and args.max_samples_per_pack < 1:
        raise ArgumentError(f"--max-samples-per-pack {args.max_samples_per_pack} must be at "
                            "least 1")
    if args.cuda_graph_impl != "local":
        return
    if not _cuda_available():
        raise ArgumentError("--cuda-graph-impl local captures CUDA graphs, and this machine has "
                            "no GPU; drop the flag")
    if not args.packing:
        raise ArgumentError("--cuda-graph-impl local replays the language layers with fixed "
                            "shapes, which packed micro-batches have ([1, seq-length]); add "
                            "--packing")
    if args.recompute_granularity == "full":
        raise ArgumentError("--cuda-graph-impl local captures whole layers, which full recompute "
                            "would re-run inside the backward (megatron-core refuses it); drop "
                            "--recompute-granularity full or the graphs")
    if args.max_samples_per_pack is None:
        args.max_samples_per_pack = DEFAULT_GRAPH_SAMPLES_PER_PACK
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # megatron-core asks for it before NCCL starts: graph-registered NCCL buffers and
        # expandable segments give illegal memory accesses on GPUs before Blackwell
        os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")


def check_model_divisibility(config, tp: int, pp: int) -> None:
    """`config` is a model.configs.LlavaOVConfig (the launcher's preflight checks it too)."""
    language, vision = config.language, config.vision
    checks = [
        ("attention heads", language.num_attention_heads, tp, "TP"),
        ("query groups (KV heads)", language.num_query_groups, tp, "TP"),
        ("vision attention heads", vision.num_attention_heads, tp, "TP"),
    ]
    if config.num_layers_in_first_pipeline_stage is None and \
            config.num_layers_in_last_pipeline_stage is None:
        checks.append(("language layers", language.num_layers, pp, "PP"))
    for what, count, parts, name in checks:
        if count % parts:
            raise ArgumentError(f"{what} ({count}) are not divisible by {name}={parts}; "
                                f"choose {name} among the divisors of {count}")


def _check_paths(args) -> None:
    data = args.data_path
    if not os.path.exists(data):
        raise ArgumentError(f"--data-path {data} does not exist")
    if os.path.isdir(data) and not os.path.isdir(os.path.join(data, ".nv-meta")):
        raise ArgumentError(f"--data-path {data} has no .nv-meta index; convert it with "
                            "tools/stage2_sftdata2webdataset.py first")
    if not os.path.exists(args.tokenizer_path):
        raise ArgumentError(f"--tokenizer-path {args.tokenizer_path} does not exist")
    if args.load and not os.path.exists(args.load):
        raise ArgumentError(f"--load {args.load} does not exist")
    for flag, given in (("--save-interval", args.save_interval), ("--async-save", args.async_save)):
        if given and not args.save:
            raise ArgumentError(f"{flag} needs --save")
    if args.save:
        _check_writable(args.save)
    for name in args.exit_signals:
        try:
            signal_from_name(name)
        except ValueError as error:
            raise ArgumentError(f"--exit-signals: {error}") from None


def _check_writable(save: str) -> None:
    """--save must be a directory we can create files in: found now, not at the first save.
    Not a checkpoint, though: a run saved into an iter_* folder would nest its own in it."""
    inside = checkpoint_paths.checkpoint_dir_around(save)
    if inside is not None:
        raise ArgumentError(f"--save {save} is {'inside ' if inside != os.path.abspath(save) else ''}"
                            f"the checkpoint {inside}: give a run folder (the one holding the "
                            f"iter_* folders, {os.path.dirname(inside)}, resumes that run) or a "
                            "new folder")
    existing = save
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        raise ArgumentError(f"--save {save}: {existing} is a file, not a directory")
    try:
        os.makedirs(save, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save, prefix=".write_test"):
            pass
    except OSError as error:
        raise ArgumentError(f"--save {save} is not writable ({error.strerror}); choose a "
                            "directory this job can write to") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def args_to_json(args: argparse.Namespace) -> str:
    return json.dumps(vars(args), indent=1, sort_keys=True, default=str)

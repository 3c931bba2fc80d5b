"""Which fused and fast kernels a run uses, decided in one place from its arguments and what
this machine has (CUDA, Transformer Engine, APEX, torch's varlen flash kernel).

Each choice has a switch (Megatron-LM's names) whose default is "on where it runs and gives the
same result"; :func:`summary` states the outcome, which the trainer logs and writes into
``run_config.json`` and the benchmark into its report, so a throughput figure always comes with
the kernels that produced it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_patch.compat import apply_wgrad_accumulation, wgrad_accumulation
from megatron_patch.model.attention import flash_varlen_kernel
from megatron_patch.model.layer_specs import resolve_backend
from megatron_patch.model.transformer_configs import language_transformer_config


def attention_backend(args) -> str:
    """The layer spec family: "te" or "local" (``--attention-backend sdpa`` is "local")."""
    return resolve_backend({"sdpa": "local"}.get(args.attention_backend, args.attention_backend),
                           torch.bfloat16 if args.bf16 else torch.float32)


def fused_swiglu(args) -> bool:
    """megatron's fused SwiGLU in the language model, and in the vision tower megatron's fused
    bias-dropout-add and our compiled bias + exact GELU (model/transformer_configs.py,
    compat/bias_gelu.py): with CUDA unless --no-bias-swiglu-fusion."""
    return args.bias_swiglu_fusion and torch.cuda.is_available()


DEFAULT_LOSS_CHUNK_TOKENS = 1024  # per chunk ~1.5 GiB of transient logits at a 152k vocabulary


def loss_chunk_tokens(args) -> int:
    """--loss-chunk-tokens: the output layer and cross entropy chunked over tokens
    (model/output_loss.py), by default with CUDA, where the whole logits cost GiBs at long
    sequences. The CPU keeps megatron's separate output layer and cross entropy, the arithmetic
    the demo's trajectory was measured with (chunking changes summation order)."""
    if args.loss_chunk_tokens is not None:
        return args.loss_chunk_tokens
    return DEFAULT_LOSS_CHUNK_TOKENS if torch.cuda.is_available() else 0


def fused_cross_entropy(args) -> bool:
    """--cross-entropy-loss-fusion, by default on for bf16 on CUDA; only where the loss is not
    chunked (the chunked loss replaces megatron's cross entropy). megatron's fused kernel returns
    the logits' gradient in bf16 (fusions/fused_cross_entropy.py): bit-identical to the unfused
    path for bf16 logits (tests/test_model_language.py), lossy for fp32 ones."""
    if loss_chunk_tokens(args):
        return False
    if args.cross_entropy_loss_fusion is not None:
        return args.cross_entropy_loss_fusion
    return args.bf16 and torch.cuda.is_available()


def gradient_accumulation_fusion(args) -> bool:
    """--gradient-accumulation-fusion, by default on with CUDA: each weight gradient's GEMM adds
    into the fp32 gradient buffer, saving a kernel, a bf16 temporary and a bf16 rounding per
    weight and micro-batch. Transformer Engine's linears fuse it themselves; megatron's own use
    APEX's kernel where installed, torch's fp32-output GEMM otherwise
    (compat/wgrad_accumulation.py). The token embedding adds its rows into its buffer instead of
    a table-sized gradient (compat/embedding_wgrad.py). The CPU may opt in but by default keeps
    DDP's separate add, the arithmetic the demo's trajectory was measured with."""
    apply_wgrad_accumulation()
    if args.gradient_accumulation_fusion is not None:
        return args.gradient_accumulation_fusion
    return torch.cuda.is_available()


def fused_rope(args) -> bool:
    """Both towers' RoPE as one compiled kernel per query/key (compat/packed_rope.py): with CUDA
    unless --no-rope-fusion. Not bit-identical to megatron's unfused bf16 arithmetic (it rounds
    once), which the CPU keeps."""
    return args.rope_fusion and torch.cuda.is_available()


def fused_qkv_preparation(args):
    """Which towers prepare their attention's queries, keys and values in one compiled kernel
    (model/qkv_fusion.py, the local spec): where RoPE is compiled, and in the language model
    (whose q/k norms join it) only where the norms are too."""
    if not fused_rope(args) or attention_backend(args) == "te":
        return False
    return "both towers" if fused_norms(args) else "the vision tower"


def cuda_graph_segments(args) -> Optional[int]:
    """--cuda-graph-impl local: the language decoder layers replay as megatron-core's CUDA
    graphs, captured for packs of this many segments (--max-samples-per-pack samples and the
    trailing padding; model/attention.with_fixed_segments). None: every layer runs eagerly."""
    if getattr(args, "cuda_graph_impl", "none") != "local":
        return None
    return args.max_samples_per_pack + 1


def fused_norms(args) -> bool:
    """Both towers' layer norms as compiled kernels (model/norms.py): with CUDA unless
    --no-norm-fusion. Not bit-identical to torch's kernels, which the CPU keeps."""
    return args.norm_fusion and torch.cuda.is_available()


def _wgrad_kernel(args):
    """False, or which kernel the fused weight gradients take (TE's linears fuse themselves)."""
    if not gradient_accumulation_fusion(args):
        return False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    own = wgrad_accumulation.describe(device, dtype)
    return f"TE's linears; the others: {own}" if attention_backend(args) == "te" else own


def adam_kernel(args) -> Optional[str]:
    """Which AdamW update runs: TE's or APEX's FusedAdam where megatron found one, else torch's
    AdamW, as one fused kernel on a GPU (compat/fused_adam.py) and torch's default on the CPU."""
    if args.optimizer != "adam":
        return None
    from megatron.core import optimizer as mcore_optimizer
    if not mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return "Transformer Engine / APEX FusedAdam"
    return "torch AdamW, fused kernel" if torch.cuda.is_available() else "torch AdamW"


def recompute_config(args) -> Dict[str, object]:
    """megatron TransformerConfig keywords for the recompute flags (arguments.py's
    add_recompute_arguments); empty without recompute."""
    if not args.recompute_granularity:
        return {}
    if args.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method=args.recompute_method,
                    recompute_num_layers=args.recompute_num_layers)
    config = dict(recompute_granularity="selective")
    if getattr(args, "recompute_modules", None):  # else megatron's default, core_attn
        config["recompute_modules"] = list(args.recompute_modules)
    return config


def model_options(args) -> Dict[str, object]:
    """build_model's keywords for the fused kernels and recompute chosen above: the trainer's
    model, and the benchmarks that count what it launches and keeps."""
    return dict(fused_kernels=fused_swiglu(args), rope_fusion=fused_rope(args),
                norm_fusion=fused_norms(args), loss_chunk_tokens=loss_chunk_tokens(args),
                cross_entropy_loss_fusion=fused_cross_entropy(args), **recompute_config(args))


def recompute(args) -> str:
    """What activation recompute runs: off, full, or selective with its modules."""
    if args.recompute_granularity != "selective":
        return args.recompute_granularity or "off"
    return f"selective ({', '.join(getattr(args, 'recompute_modules', None) or ['core_attn'])})"


def recomputed_flops(args) -> Optional[str]:
    """What recompute repeats in matmul FLOPs (flops.training_flops): "full", "mlp" or None."""
    if args.recompute_granularity == "full":
        return "full"
    if args.recompute_granularity == "selective" and "mlp" in (
            getattr(args, "recompute_modules", None) or ()):
        return "mlp"
    return None


def recomputed_layers(args, cfg) -> Optional[Tuple[int, int]]:
    """(language, vision) decoder layers that full recompute runs again, None for all of them
    (flops.training_flops). megatron's uniform method repeats every layer; its block method the
    first ``--recompute-num-layers`` of each pipeline stage's language layers and of the vision
    tower's (built whole on the first stage)."""
    if args.recompute_granularity != "full" or args.recompute_method != "block":
        return None
    stages = args.pipeline_model_parallel_size
    config = language_transformer_config(cfg, pipeline_model_parallel_size=stages)
    first = args.recompute_num_layers
    language = sum(min(first, get_num_layers_to_build(config, pp_rank=rank))
                   for rank in range(stages))
    return language, min(first, cfg.vision.num_layers)


def summary(args) -> Dict[str, object]:
    """What this run computes with, in words and switches (see the module docstring)."""
    if attention_backend(args) == "te":
        attention = "Transformer Engine (flash/cuDNN; packed sequences natively)"
    elif torch.cuda.is_available() and args.bf16 and args.packed_attention_kernel == "cudnn":
        attention = "torch SDPA; packed sequences: torch cuDNN attention kernel"
    elif torch.cuda.is_available() and args.bf16 and flash_varlen_kernel() is not None:
        attention = "torch SDPA; packed sequences: torch varlen flash kernel"
    else:
        attention = "torch SDPA; packed sequences: one call per sample"
    return {
        "attention": attention,
        "precision": "bf16 weights, fp32 master weights and gradients" if args.bf16 else "fp32",
        "fused_swiglu": fused_swiglu(args),
        "fused_rope": fused_rope(args),
        "fused_norms": fused_norms(args),
        "fused_qkv_preparation": fused_qkv_preparation(args),
        "fused_cross_entropy": fused_cross_entropy(args),
        "loss_chunk_tokens": loss_chunk_tokens(args),
        "gradient_accumulation_fusion": _wgrad_kernel(args),
        "cuda_graphs": (f"language layers, packs of {cuda_graph_segments(args)} segments"
                        if cuda_graph_segments(args) else False),
        "recompute": recompute(args),
        "adam": adam_kernel(args),
        "sequence_parallel": args.sequence_parallel,
        "distributed_optimizer": args.use_distributed_optimizer,
        "overlap_grad_reduce": args.overlap_grad_reduce,
        "overlap_param_gather": args.overlap_param_gather,
    }

"""What the trainer builds from its arguments, shared with the evaluator and the benchmarks:
the model config, this rank's wrapped model stage, the task encoder's settings, and the
parameter gather that --overlap-param-gather needs before evaluating or saving."""
import contextlib

import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)

from megatron_patch.compat import apply_batched_grad_adds
from megatron_patch.data.sft_task_encoder import EncoderSettings
from megatron_patch.data.tokenizer import SFTTokenizer
from megatron_patch.model import build_model, get_config
from megatron_patch.training import arguments, kernels
from megatron_patch.training.optimizer import freeze_modules


def model_config(args, tokenizer: SFTTokenizer):
    """The named config + size overrides, with the tokenizer's image token (any namespace with
    the override attributes works: the evaluator passes its own)."""
    overrides = arguments.model_overrides(args)
    overrides["image_token_id"] = tokenizer.image_pad_id
    cfg = get_config(args.model, overrides)
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise arguments.ArgumentError(
            f"tokenizer {args.tokenizer_path} has {tokenizer.vocab_size} tokens but model "
            f"{args.model} only {cfg.language.vocab_size} embeddings; use the model's own tokenizer")
    return cfg


def wrap_model(args, cfg, device: torch.device):
    """This rank's model stage, frozen per --trainable-modules, in megatron's DDP wrapper."""
    model = build_model(cfg, attention_backend=kernels.attention_backend(args),
                        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                        calculate_per_token_loss=True, use_cpu_initialization=True,
                        gradient_accumulation_fusion=kernels.gradient_accumulation_fusion(args),
                        cuda_graph_segments=kernels.cuda_graph_segments(args),
                        packed_attention_kernel=args.packed_attention_kernel,
                        sequence_parallel=args.sequence_parallel, **kernels.model_options(args))
    trainable = freeze_modules(model, args.trainable_modules)
    model.to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather)
    apply_batched_grad_adds()  # before the wrapper registers its gradient hooks
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp, trainable


@contextlib.contextmanager
def parameters_gathered(model):
    """Up-to-date parameters for evaluation and saving under --overlap-param-gather.

    With that flag the distributed optimizer's step leaves each rank's updated shard in place;
    the all-gather runs bucket by bucket in forward pre-hooks of the next training step. An
    evaluation or a checkpoint in between would see (and save) the previous step's weights, so
    the hooks are removed with a forced all-gather first and put back after."""
    if not getattr(model, "use_forward_hook", False):
        yield
        return
    model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def encoder_settings(args) -> EncoderSettings:
    return EncoderSettings(
        seq_length=args.seq_length, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        overlong=args.overlong, packing=args.packing, max_images_per_pack=args.max_images_per_pack,
        max_samples_per_pack=args.max_samples_per_pack,
        packing_buffer_size=args.packing_buffer_size,
        pad_to_seq_length=args.packing or args.pipeline_model_parallel_size > 1,
        pad_to_multiple_of=args.tensor_model_parallel_size if args.sequence_parallel else 1)

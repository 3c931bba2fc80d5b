"""Freezing, per-module learning rates, megatron-core's optimizer and its LR schedule.

A fresh projector usually wants a larger learning rate than a pretrained LLM (LLaVA and nanoVLM
recipes do this), and a stage-1 run trains the adapter alone. Both map onto megatron-core 0.16's
``config_overrides``: a ``ParamKey`` (name glob) per module with its own ``max_lr``/``min_lr``,
merged with megatron's standard "no weight decay on biases and norms" override.
"""
from typing import Dict, List, Sequence

import torch
from megatron.core.optimizer import (OptimizerConfig, ParamKey, get_megatron_optimizer,
                                     get_standard_config_overrides)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.compat import (apply_foreach_multi_tensor, apply_torch_adam_fixes,
                                   use_fused_adam)

MODULES = ("vision_model", "adapter", "language_model")


class OptimizerSetupError(ValueError):
    """A setting the optimizer cannot honour; the message says what to change."""


def freeze_modules(model: torch.nn.Module, trainable: Sequence[str]) -> Dict[str, int]:
    """Sets requires_grad from `--trainable-modules`; returns trainable parameter counts by module.

    Must run before the DDP wrapper is built: megatron's grad buffers only hold trainable params.
    """
    unknown = set(trainable) - set(MODULES)
    if unknown:
        raise OptimizerSetupError(f"unknown --trainable-modules {sorted(unknown)}; "
                                  f"choose among {list(MODULES)}")
    counts = {name: 0 for name in MODULES}
    for name, param in model.named_parameters():
        module = name.split(".", 1)[0]
        param.requires_grad_(module in trainable)
        if module in trainable:
            counts[module] += param.numel()
    return counts


def module_learning_rates(args) -> Dict[str, float]:
    """Peak learning rate of each module: --lr-vision / --lr-adapter, else --lr."""
    return {"vision_model": args.lr if args.lr_vision is None else args.lr_vision,
            "adapter": args.lr if args.lr_adapter is None else args.lr_adapter,
            "language_model": args.lr}


def module_lr_overrides(args) -> Dict[ParamKey, dict]:
    """An override for each module whose learning rate differs from --lr: its own max/min lr
    (min lr in the same proportion as --min-lr to --lr, so the schedule keeps its shape).

    The override also sets ``lr_mult`` to the ratio. megatron-core 0.16's scheduler ignores
    lr_mult (it reads max_lr/min_lr), but its optimizer matches saved param groups to live ones
    by (wd_mult, lr_mult, ...) when loading a checkpoint: without a distinct lr_mult two groups
    that differ only in learning rate would be confused on resume. Modules with equal rates
    share one group.
    """
    if args.lr <= 0:
        raise OptimizerSetupError("--lr must be positive (per-module rates are set relative to it)")
    overrides = {}
    for module, lr in module_learning_rates(args).items():
        if lr != args.lr:
            ratio = lr / args.lr
            # megatron matches names with fnmatch; the DDP wrapper prefixes "module."
            key = ParamKey(name=(f"{module}.*", f"*.{module}.*"))
            overrides[key] = {"max_lr": lr, "min_lr": args.min_lr * ratio, "lr_mult": ratio}
    return overrides


def optimizer_config(args) -> OptimizerConfig:
    if args.optimizer == "muon":
        raise OptimizerSetupError(
            "--optimizer muon needs NVIDIA's emerging_optimizers package, which megatron-core's "
            "Muon imports; it is not on PyPI (install it from its GitHub repository) - use adam")
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=getattr(args, "sgd_momentum", 0.9), clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather)


def build_optimizer(args, model_chunks: List[torch.nn.Module]):
    """megatron-core optimizer over the trainable parameters, with per-module learning rates."""
    config = optimizer_config(args)
    apply_foreach_multi_tensor()  # no-op with TE's or Apex's kernels; CUDA tensors only
    if config.use_distributed_optimizer:
        apply_torch_adam_fixes()  # no-op when megatron uses TE's or Apex's FusedAdam
    overrides = dict(get_standard_config_overrides(config))
    overrides.update(module_lr_overrides(args))
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    use_fused_adam(optimizer)  # torch's AdamW in one kernel on a GPU; no-op on CPU, with TE/APEX
    return optimizer


def build_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Warmup then cosine/linear/constant decay to ``--min-lr``, counted in iterations.

    Megatron-LM counts the schedule in samples (iterations x global batch); we do the same so a
    checkpoint's scheduler state means the same thing in both tools."""
    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant")


def schedule_kept_from_checkpoint(scheduler: OptimizerParamScheduler, args) -> List[str]:
    """After a resume, how the schedule the scheduler now follows (the checkpoint's: megatron's
    rule, as in Megatron-LM without --override-opt_param-scheduler) differs from the one `args`
    ask for, in iterations at this run's global batch. A run resumed with a larger --train-iters
    would otherwise spend its extra iterations at --min-lr without a word."""
    gbs = args.global_batch_size
    asked = {"--lr": (scheduler.max_lr, args.lr), "--min-lr": (scheduler.min_lr, args.min_lr),
             "--lr-warmup-iters": (scheduler.lr_warmup_steps / gbs, args.lr_warmup_iters),
             "--lr-decay-iters": (scheduler.lr_decay_steps / gbs, args.lr_decay_iters),
             "--lr-decay-style": (scheduler.lr_decay_style, args.lr_decay_style)}
    return [f"{flag} {kept:g} (this run asks for {wanted:g})" if not isinstance(kept, str)
            else f"{flag} {kept} (this run asks for {wanted})"
            for flag, (kept, wanted) in asked.items() if kept != wanted]


def learning_rates_by_module(optimizer, args) -> Dict[str, float]:
    """Current learning rate of each trainable module (found by its group's lr_mult; megatron
    aligns param groups across ranks, so every rank can report every module)."""
    rates = {}
    for module, lr in module_learning_rates(args).items():
        if module not in args.trainable_modules:
            continue
        ratio = lr / args.lr
        for group in optimizer.param_groups:
            if group.get("lr_mult", 1.0) == ratio:
                rates[module] = group["lr"]
                break
    return rates

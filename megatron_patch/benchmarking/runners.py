"""The two trainers the throughput benchmark measures, behind one ``step(micro_batches)`` call.

* :class:`MegatronRunner` is the real trainer's step: the model built by
  ``components.wrap_model`` (megatron DDP, recompute, attention backend, bf16 params), the
  optimizer from ``optimizer.build_optimizer`` (megatron mixed precision, fp32 master weights),
  then ``train_step.run_micro_batches`` + ``guarded_optimizer_step`` -- the calls
  ``Trainer.train_step`` makes, minus the statistics and the LR scheduler (a constant LR costs
  the same).
* the baseline (``benchmarks/baseline_llava.py``, outside the package) is loaded from the
  repository checkout by path.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch

from megatron_patch.training import arguments
from megatron_patch.training.components import wrap_model
from megatron_patch.training.optimizer import build_optimizer
from megatron_patch.training.train_step import guarded_optimizer_step, run_micro_batches

BASELINE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks", "baseline_llava.py")

# benchmark option -> trainer option (same meaning, passed through)
_PASSED = ("model", *arguments.MODEL_OVERRIDE_KEYS, *arguments.KERNEL_SWITCH_KEYS,
           "attention_backend", "recompute_granularity", "recompute_method", "recompute_modules",
           "recompute_num_layers", "micro_batch_size", "global_batch_size", "seq_length", "bf16",
           "use_distributed_optimizer", "lr", "clip_grad", "seed", "num_workers", "packing",
           "max_images_per_pack", "max_samples_per_pack", "data_path", "tokenizer_path")


def trainer_namespace(bench_args, world_size: int = 1):
    """The trainer's own argument namespace (its defaults: Adam betas, eps, weight decay ...)
    with the benchmark's settings, validated by the trainer's ``validate_args`` (real data) or
    the same batch/precision checks (synthetic data, which has no paths to check)."""
    args = arguments.build_parser().parse_args(
        ["--train-iters", str(bench_args.warmup_steps + bench_args.steps),
         "--data-path", bench_args.data_path or "synthetic",
         "--tokenizer-path", bench_args.tokenizer_path or "synthetic"])
    for name in _PASSED:
        if hasattr(bench_args, name):
            setattr(args, name, getattr(bench_args, name))
    args.lr_warmup_iters, args.lr_decay_style = 0, "constant"
    return arguments.validate_args(args, world_size, check_paths=bench_args.data_path is not None)


class MegatronRunner:
    name = "megatron"

    def __init__(self, train_args, cfg, device: torch.device):
        self.args, self.device = train_args, device
        self.model, _ = wrap_model(train_args, cfg, device)
        self.chunks = [self.model]
        self.optimizer = build_optimizer(train_args, self.chunks)
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.skipped_steps = 0

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.module.parameters())

    def step(self, micro_batches) -> torch.Tensor:
        """One optimizer step; ``[sum of masked token losses, assistant tokens]``."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_pair = run_micro_batches(self.chunks, micro_batches, self.args.seq_length,
                                      self.args.micro_batch_size, self.device, forward_only=False)
        if not guarded_optimizer_step(self.optimizer, self.args.clip_grad).stepped:
            self.skipped_steps += 1
        return loss_pair

    def close(self) -> None:
        del self.model, self.chunks, self.optimizer


def load_baseline() -> ModuleType:
    """``benchmarks/baseline_llava.py`` of this checkout, imported by path."""
    name = "benchmarks_baseline_llava"
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(BASELINE_PATH):
        raise FileNotFoundError(
            f"the baseline trainer {BASELINE_PATH} is not here (it lives in the repository's "
            "benchmarks/, not in the installed package); run from a checkout")
    spec = importlib.util.spec_from_file_location(name, BASELINE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def baseline_runner(train_args, cfg, device: torch.device):
    baseline = load_baseline()
    return baseline.BaselineTrainer(
        cfg, device, bf16=train_args.bf16, lr=train_args.lr,
        betas=(train_args.adam_beta1, train_args.adam_beta2), eps=train_args.adam_eps,
        weight_decay=train_args.weight_decay, clip_grad=train_args.clip_grad,
        recompute=train_args.recompute_granularity, seed=train_args.seed)

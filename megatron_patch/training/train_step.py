"""One training step: micro-batches through megatron's pipeline schedule, then a guarded
optimizer step.

Loss: the sum of masked per-token losses over the global batch divided by the number of
assistant tokens in it (``calculate_per_token_loss``: megatron divides the gradients by the token
count gathered over micro-batches and data-parallel ranks). A long answer therefore weighs more
than a short one, as in the usual SFT recipes, and the result does not depend on how the global
batch is split into micro-batches or ranks.

The optimizer step is skipped (and counted by the caller) when the gradient norm is NaN or inf;
megatron's fp32 optimizer would otherwise apply the poisoned update.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.model.attention import covering_packed_seq_params


def model_inputs(batch, device: torch.device) -> dict:
    """Keyword arguments of LlavaOVModel.forward for one micro-batch. ``loss_mask`` stays on the
    host: the chunked loss picks the tokens in the loss from it without a device sync
    (model/language.py); the loss function takes a device copy."""
    inputs = dict(
        input_ids=batch.tokens.to(device, non_blocking=True),
        position_ids=batch.position_ids.to(device, non_blocking=True),
        labels=batch.labels.to(device, non_blocking=True),
        loss_mask=batch.loss_mask,
        pixel_values=None, image_grid_thw=None, packed_seq_params=None)
    if batch.image_grid_thw.numel():
        inputs["pixel_values"] = batch.pixel_values.to(device, non_blocking=True)
        inputs["image_grid_thw"] = batch.image_grid_thw  # stays on the host: the vision tower
        # reads it there (patch positions, segment offsets); on the GPU it would cost a sync
    if batch.cu_seqlens is not None:
        inputs["packed_seq_params"] = covering_packed_seq_params(
            batch.cu_seqlens, batch.tokens.shape[1], batch.max_seqlen, device)
    return inputs


def masked_loss(loss_mask: torch.Tensor, poison: bool = False) -> Callable:
    """The loss function megatron's schedule calls on the last stage's per-token losses."""

    def loss_func(per_token_loss: torch.Tensor):
        mask = loss_mask.view(-1).float()
        total = (per_token_loss.view(-1).float() * mask).sum()
        if poison:  # fault injection (--debug-nan-at-iteration): a NaN loss, as a bad batch gives
            total = total * float("nan")
        tokens = mask.sum().to(torch.int)
        return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}

    return loss_func


def make_forward_step(device: torch.device, poison: bool = False) -> Callable:
    def forward_step(data_iterator, model):
        inputs = model_inputs(next(data_iterator), device)
        loss_mask = inputs["loss_mask"].to(device, non_blocking=True)
        return model(**inputs), masked_loss(loss_mask, poison)

    return forward_step


def loss_sum_and_tokens(losses_reduced: Sequence[dict]) -> torch.Tensor:
    """[sum of masked losses, assistant tokens] over this rank's micro-batches (last stage;
    zeros elsewhere)."""
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses_reduced:
        total += item["lm loss"].detach().double().cpu()
    return total


def run_micro_batches(model_chunks, micro_batches: List, seq_length: int, micro_batch_size: int,
                      device: torch.device, forward_only: bool, poison: bool = False) -> torch.Tensor:
    """Forward (and backward) over the micro-batches with megatron's schedule for this PP size."""
    losses = get_forward_backward_func()(
        forward_step_func=make_forward_step(device, poison), data_iterator=iter(micro_batches),
        model=model_chunks, num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    return loss_sum_and_tokens(losses)


@dataclass
class OptimizerOutcome:
    stepped: bool
    grad_norm: Optional[float]


def _chained(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def guarded_optimizer_step(optimizer, clip_grad: float) -> OptimizerOutcome:
    """megatron's step (prepare grads, norm, clip, update) that refuses a non-finite norm.

    The norm is reduced over the model-parallel group after the data-parallel all-reduce, so
    every rank takes the same decision."""
    if optimizer.prepare_grads():  # mixed precision found inf/nan while unscaling
        return OptimizerOutcome(False, None)
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return OptimizerOutcome(False, grad_norm)
    if clip_grad > 0:
        for inner in _chained(optimizer):
            params = inner.get_parameters()
            if params and not getattr(inner, "is_stub_optimizer", False):
                # looked up on the module so the CPU redirect (compat/cpu.py) applies
                mcore_optimizer.clip_grad_by_total_norm_fp32(
                    params, clip_grad, grad_norm,
                    inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return OptimizerOutcome(bool(optimizer.step_with_ready_grads()), grad_norm)

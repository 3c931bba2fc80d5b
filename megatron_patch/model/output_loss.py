"""The output layer and the cross entropy as one operation over chunks of tokens, so the
``[tokens, vocab]`` logits never exist whole.

Why: megatron computes the logits of every token (``[8192, 151936]`` at seq 8192: 2.3 GiB in
bf16), casts them to fp32 and keeps the fp32 softmax for the backward (4.6 GiB), and the backward
makes a logits-sized gradient again. On the GPU benchmark's model that softmax was the largest
saved tensor of the whole step (docs/BENCHMARKS.md, activation memory by source), and the peak
(88 GiB) did not fit an 80 GB H100.

How, for each chunk of ``chunk_tokens`` tokens:

* forward: the chunk's logits over this rank's vocabulary shard, from which each token's
  log-sum-exp and its label's logit are kept (``[tokens]`` vectors), and the logits' gradient
  before the incoming gradient's scaling, softmax minus the label's one-hot, rounded to bf16
  (``[tokens, vocab / TP]``: 0.3 MB per token at Qwen's 152k vocabulary, for the tokens in the
  loss only). Across tensor-parallel ranks the log-sum-exp and label logit combine with three
  all-reduces of those vectors, as megatron's vocab-parallel cross entropy does, and each
  rank's softmax, normalised over its own shard, is rescaled in the backward;
* backward: that gradient times the incoming one, then the input-gradient GEMM and the
  weight-gradient GEMM, which adds into the fp32 ``main_grad`` under gradient-accumulation
  fusion (no logits-sized gradient, no weight-sized temporary). Keeping the gradient instead of
  recomputing the logits saves one GEMM of the output layer's forward size: its hardware work
  is 3x the loss tokens' logits, as megatron's, not 4x.

On a GPU each chunk's elementwise work (log-sum-exp, label logit, softmax and one-hot in the
forward; scaling in the backward) runs as torch.compile'd kernels that read the bf16 values
once or twice, where the eager ops would pass over fp32 ``[rows, vocab]`` values ~6 times.
Which tokens enter at all is the caller's choice: the language model passes only those in the
loss (model/language.py).

The arithmetic is megatron's: bf16 logits from a bf16 GEMM, fp32 softmax, the logits' gradient
in the weight dtype. What changes is summation order (per-chunk weight gradients, log-sum-exp
combined across TP ranks) and one more rounding (the gradient is rounded to bf16 before its
scaling, then after), so results agree with megatron's path to float rounding, not bit for bit
(tests/test_model_output_loss.py). One value differs on purpose: a label outside the
vocabulary (a padding id, always under loss mask 0) has no logit, and its loss here is the
log-sum-exp, where megatron's is the log-sum-exp minus the largest logit (an artefact of its
shifted logits); its gradient, the softmax without a one-hot term, is megatron's.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_patch.compat import wgrad_accumulation


def _chunks(count: int, size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)


def _label_columns(logits: torch.Tensor, local_labels: torch.Tensor,
                   in_shard: torch.Tensor) -> torch.Tensor:
    """``[rows, vocab shard]``: True at each row's label, where it lies in this shard."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    return (columns[None, :] == local_labels[:, None]) & in_shard[:, None]


def softmax_statistics(logits: torch.Tensor, local_labels: torch.Tensor, in_shard: torch.Tensor,
                       keep_gradient: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per row of a chunk's logits (this rank's vocab shard), in fp32: the label's logit (0
    where the label is in another shard) and the log-sum-exp; with ``keep_gradient``, also
    softmax - one-hot of the label over this shard, rounded to the logits' dtype (the logits'
    gradient for an incoming gradient of 1, before the TP rescaling)."""
    logits32 = logits.float()
    label_logit = torch.where(in_shard, logits32.gather(1, local_labels[:, None]).squeeze(1), 0.0)
    logsumexp = torch.logsumexp(logits32, dim=1)
    if not keep_gradient:
        return label_logit, logsumexp, None
    probs = (logits32 - logsumexp[:, None]).exp()
    is_label = _label_columns(logits, local_labels, in_shard)
    return label_logit, logsumexp, torch.where(is_label, probs - 1.0, probs).to(logits.dtype)


def scaled_gradient(kept: torch.Tensor, scale: torch.Tensor, label_shift: Optional[torch.Tensor],
                    local_labels: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
    """The logits' gradient from the kept one, per row: ``kept * scale``, plus ``label_shift``
    at the label's column, in fp32, rounded to the kept dtype. With one vocab shard ``scale``
    is the incoming gradient and there is no ``label_shift`` (megatron's backward); across
    shards see ``_ChunkedLinearCrossEntropy.backward``."""
    gradient = kept.float() * scale[:, None]
    if label_shift is not None:
        is_label = _label_columns(kept, local_labels, in_shard)
        gradient = torch.where(is_label, gradient + label_shift[:, None], gradient)
    return gradient.to(kept.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(kernel: Callable) -> Callable:
    """Fused kernels instead of ~6 elementwise passes over the chunk's [rows, vocab] logits
    (each several bytes per element: at 152k vocab the traffic, not the GEMM, would set the
    pace). Shapes are dynamic from the start: the chunks' row counts vary. A compiler that
    fails (a broken Triton or C compiler on the node) is reported with the way around it."""
    compiled = torch.compile(kernel, dynamic=True)

    @functools.wraps(kernel)
    def run(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            raise RuntimeError(
                f"torch.compile failed on the chunked loss's {kernel.__name__} ({error}); run "
                "with --loss-chunk-tokens 0 (megatron's output layer and cross entropy) or fix "
                "the node's compiler setup (scripts/gpu_checks.sh's preflight tests it)") from error

    return run


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _kernel(kernel: Callable, compiled: bool) -> Callable:
    return _compiled(kernel) if compiled else kernel


def _global_logsumexp(local: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(local)): each rank holds the log-sum-exp of its vocab shard."""
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = (local - peak).exp_()
    dist.all_reduce(total, group=group)
    return total.log_().add_(peak)


def _accumulate_weight_gradient(hidden: torch.Tensor, grad_logits: torch.Tensor,
                                into: torch.Tensor) -> None:
    """``into += grad_logits^T hidden`` with the best GEMM this device has for ``into``'s dtype."""
    if into.dtype == torch.float32:
        wgrad_accumulation.wgrad_gemm_accum_fp32(hidden, grad_logits, into)
    else:
        wgrad_accumulation.wgrad_gemm_accum_fp16(hidden, grad_logits, into)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, tp_group, fuse_wgrad, compiled,
                keep_gradient):
        vocab_shard = weight.shape[0]
        tp_size = get_pg_size(tp_group)
        first = get_pg_rank(tp_group) * vocab_shard
        local_labels = labels - first
        in_shard = (local_labels >= 0) & (local_labels < vocab_shard)
        local_labels = torch.where(in_shard, local_labels, 0)
        logsumexp = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        label_logit = torch.empty_like(logsumexp)
        statistics = _kernel(softmax_statistics, compiled)
        kept = []
        for start, stop in _chunks(hidden.shape[0], chunk_tokens):
            logits = torch.mm(hidden[start:stop], weight.t())  # the weight dtype, as megatron's
            label_logit[start:stop], logsumexp[start:stop], gradient = statistics(
                logits, local_labels[start:stop], in_shard[start:stop], keep_gradient)
            if keep_gradient:
                kept.append(gradient)
            del logits
        shard_share = None  # of the softmax: 1 with one shard
        if tp_size > 1:
            shard_logsumexp, logsumexp = logsumexp, _global_logsumexp(logsumexp, tp_group)
            dist.all_reduce(label_logit, group=tp_group)
            # each shard's softmax is normalised over the shard: exp(shard lse - global lse)
            # rescales it to the whole vocabulary's
            shard_share = (shard_logsumexp - logsumexp).exp_()
        if keep_gradient:
            ctx.save_for_backward(hidden, weight, local_labels, in_shard, shard_share, *kept)
            ctx.chunk_tokens, ctx.fuse_wgrad, ctx.compiled = chunk_tokens, fuse_wgrad, compiled
        return logsumexp - label_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, in_shard, shard_share, *kept = ctx.saved_tensors
        # the logits' gradient is g * (share * softmax_shard - one-hot); kept is softmax_shard -
        # one-hot, so it is (g * share) * kept + g * (share - 1) at the label's column
        scale, label_shift = grad_loss.float(), None
        if shard_share is not None:
            scale, label_shift = scale * shard_share, scale * (shard_share - 1.0)
        gradient = _kernel(scaled_gradient, ctx.compiled)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        fused = ctx.fuse_wgrad and hasattr(weight, "main_grad")
        weight_grad_sum = None
        if ctx.needs_input_grad[1]:
            weight_grad_sum = weight.main_grad if fused else torch.zeros(
                weight.shape, dtype=torch.float32, device=weight.device)
        for (start, stop), chunk_kept in zip(_chunks(hidden.shape[0], ctx.chunk_tokens), kept):
            shift = None if label_shift is None else label_shift[start:stop]
            grad_logits = gradient(chunk_kept, scale[start:stop], shift, local_labels[start:stop],
                                   in_shard[start:stop])
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:stop])
            if weight_grad_sum is not None:
                _accumulate_weight_gradient(hidden[start:stop], grad_logits, weight_grad_sum)
            del grad_logits
        grad_weight = None
        if weight_grad_sum is not None:
            grad_weight = wgrad_accumulation.placeholder_weight_gradient(weight) if fused else \
                weight_grad_sum.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int, tp_group=None, fuse_wgrad: bool = False,
                         compiled: Optional[bool] = None) -> torch.Tensor:
    """Per-token cross entropy ``[tokens]`` (fp32) of ``hidden @ weight^T`` against ``labels``.

    ``hidden`` ``[tokens, h]`` is the whole input on every TP rank (the caller gathers it and
    reduces its gradient: megatron's region functions); ``weight`` ``[vocab / TP, h]`` is this
    rank's shard, rank r holding rows ``r * vocab / TP`` onwards. ``fuse_wgrad``: the weight's
    gradient adds into its ``main_grad`` (megatron's ``gradient_accumulation_fusion``).
    ``compiled`` (default: on a GPU) runs each chunk's elementwise work as torch.compile'd
    kernels; the CPU keeps the eager ones, the same arithmetic in more passes."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if compiled is None:
        compiled = _on_gpu(hidden)
    # the forward keeps the logits' gradient only where a backward can follow (not in
    # evaluation): a Function's forward cannot tell, it always runs without grad mode
    keep_gradient = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, tp_group,
                                            fuse_wgrad, compiled, keep_gradient)

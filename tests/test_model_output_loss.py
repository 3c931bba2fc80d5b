"""The chunked output layer + cross entropy (model/output_loss.py) against megatron's separate
output layer and vocab-parallel cross entropy: same per-token losses and gradients for any
incoming gradient, any chunk size, labels outside the vocabulary, fused weight gradients and
frozen weights. The TP=2 / sequence-parallel equality runs in tests/test_model_parallel.py."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_patch.model.output_loss import linear_cross_entropy
from test_model_reference import init_parallel

TOKENS, HIDDEN, VOCAB = 37, 16, 50


def _inputs(dtype=torch.float32, seed=0, padding=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    if padding:
        labels[3], labels[11] = -100, VOCAB + 3  # padding ids outside the vocabulary
    upstream = torch.rand(TOKENS, generator=generator)  # any incoming gradient, not only ones
    return hidden, weight, labels, upstream


def _megatron(hidden, weight, labels, upstream):
    """megatron's path: the output layer's GEMM, then vocab_parallel_cross_entropy."""
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = torch.mm(hidden, weight.t())
    loss = vocab_parallel_cross_entropy(logits[:, None], labels[:, None])[:, 0]
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def _chunked(hidden, weight, labels, upstream, chunk_tokens):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens)
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture(autouse=True)
def _parallel_state():
    init_parallel(1, 1)


@pytest.mark.parametrize("chunk_tokens", [1, 5, TOKENS, 1000])
def test_fp32_equals_megatrons_output_layer_and_cross_entropy(chunk_tokens):
    inputs = _inputs()
    expected, got = _megatron(*inputs), _chunked(*inputs, chunk_tokens)
    for name, want, have in zip(("hidden grad", "weight grad"), expected[1:], got[1:]):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=name)
    in_vocab = (inputs[2] >= 0) & (inputs[2] < VOCAB)
    torch.testing.assert_close(got[0][in_vocab], expected[0][in_vocab], rtol=1e-5, atol=1e-6)
    # a label outside the vocabulary has no logit: the loss is the log-sum-exp (megatron's
    # subtracts the largest logit too; these positions carry loss mask 0)
    logits = torch.mm(inputs[0], inputs[1].t())
    torch.testing.assert_close(got[0][~in_vocab], torch.logsumexp(logits[~in_vocab], dim=1))


def test_bf16_is_as_close_to_exact_arithmetic_as_megatrons_path():
    """bf16 weights: bf16 logits and logits' gradient in both paths; only summation order
    differs, so both stay within bf16 rounding of the float64 result."""
    inputs = _inputs(torch.bfloat16, padding=False)
    exact = _megatron(*(t.double() if t.is_floating_point() else t for t in inputs))
    megatron, chunked = _megatron(*inputs), _chunked(*inputs, 5)
    assert chunked[1].dtype == chunked[2].dtype == torch.bfloat16
    for index, name in enumerate(("loss", "hidden grad", "weight grad")):
        want = exact[index].float()
        megatron_error = (megatron[index].float() - want).abs().max()
        chunked_error = (chunked[index].float() - want).abs().max()
        assert chunked_error <= 2 * megatron_error + 1e-3 * want.abs().max(), name


def test_fused_weight_gradient_adds_into_main_grad_like_megatrons_linears():
    hidden, weight, labels, upstream = _inputs()
    _, _, expected = _megatron(hidden, weight, labels, upstream)
    weight = weight.clone().requires_grad_()
    earlier = torch.randn(VOCAB, HIDDEN)  # an earlier micro-batch's gradient
    weight.main_grad, weight.grad_added_to_main_grad = earlier.clone(), False
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels, 5, fuse_wgrad=True)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(weight.main_grad, earlier + expected, rtol=1e-5, atol=1e-6)
    assert weight.grad_added_to_main_grad is True  # DDP's hook must not add weight.grad again
    assert weight.grad is not None and weight.grad.shape == weight.shape  # megatron's placeholder


def test_frozen_weight_gets_no_gradient_and_its_input_still_does():
    hidden, weight, labels, upstream = _inputs()
    _, expected_hidden_grad, _ = _megatron(hidden, weight, labels, upstream)
    weight.main_grad = torch.zeros_like(weight)
    hidden.requires_grad_()
    (linear_cross_entropy(hidden, weight, labels, 5, fuse_wgrad=True) * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, expected_hidden_grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None and not weight.main_grad.any()


def test_chunk_size_must_be_positive():
    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, weight, labels, 0)


@pytest.mark.parametrize("fusion", [True, False])
def test_trainer_step_with_the_chunked_loss_gives_megatrons_gradients(fusion):
    """The trainer's real step (megatron DDP, the optimizer, two micro-batches of 256 tokens in
    chunks of 100): the same loss and gradient buffers as megatron's output layer and cross
    entropy, with the output layer's weight gradient added into its buffer by the chunked loss
    under --gradient-accumulation-fusion and by DDP's hook without."""
    from test_compat_wgrad_accumulation import gradients_after_one_step
    switch = ["--gradient-accumulation-fusion" if fusion else "--no-gradient-accumulation-fusion"]
    loss, grads, fused, _ = gradients_after_one_step(switch + ["--loss-chunk-tokens", "100"])
    ref_loss, ref_grads, ref_fused, _ = gradients_after_one_step(switch + ["--loss-chunk-tokens",
                                                                           "0"])
    assert fused == ref_fused and ("language_model.output_layer.weight" in fused) is fusion
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


class _OutputGemmRows(TorchDispatchMode):
    """Rows of every matrix product against the ``[vocab, h]`` output weight (transposed)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "mm" and args[1].shape[1] == self.vocab:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _tiny_model_losses(loss_chunk_tokens, mask, upstream):
    from megatron_patch.model import build_model, get_config
    from test_model_reference import image_batch
    cfg = get_config("tiny")
    ids, pixels, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 2)], 32, [0, 1])
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local", loss_chunk_tokens=loss_chunk_tokens)
    gemms = _OutputGemmRows(cfg.language.vocab_size)
    with gemms:
        loss = model(ids, torch.arange(ids.shape[1]).expand_as(ids), pixel_values=pixels,
                     image_grid_thw=grid, labels=torch.roll(ids, -1, 1), loss_mask=mask)
        (loss * mask * upstream).sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, gemms.rows


def test_only_the_tokens_in_the_loss_are_computed_and_their_gradients_are_megatrons():
    """A loss mask with 23 of 64 tokens: the chunked loss runs the output layer on those 23
    (chunks of 10: GEMMs of 10, 10 and 3 rows), and only in the forward (the backward starts
    from the kept gradient, as megatron's from its saved softmax), and reports 0 for the
    others; the masked loss and every gradient equal megatron's full-logits path."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 32)
    mask.view(-1)[torch.randperm(64, generator=generator)[:23]] = 1.0
    upstream = torch.rand(2, 32, generator=generator)
    loss, grads, rows = _tiny_model_losses(10, mask, upstream)
    ref_loss, ref_grads, ref_rows = _tiny_model_losses(0, mask, upstream)
    assert ref_rows == [64] and rows == [10, 10, 3]  # forward and backward
    assert torch.equal(loss[mask == 0], torch.zeros(41))
    torch.testing.assert_close(loss[mask == 1], ref_loss[mask == 1], rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_micro_batch_without_loss_tokens_has_zero_loss_and_gradient():
    mask = torch.zeros(2, 32)
    loss, grads, rows = _tiny_model_losses(10, mask, torch.ones(2, 32))
    assert rows == [] and not loss.any()
    assert not grads["language_model.output_layer.weight"].any()


def test_compiled_chunk_kernels_equal_the_eager_ones():
    """On a GPU each chunk's elementwise work runs as torch.compile'd kernels (here the CPU's
    inductor build, ~5 s): the same losses and gradients to float rounding, and, the shapes
    being dynamic, for any chunk size."""
    inputs = _inputs()
    eager = _chunked(*inputs, 5)
    for chunk_tokens in (5, 8):
        hidden, weight = (t.clone().requires_grad_() for t in inputs[:2])
        loss = linear_cross_entropy(hidden, weight, inputs[2], chunk_tokens, compiled=True)
        (loss * inputs[3]).sum().backward()
        for want, have in zip(eager, (loss.detach(), hidden.grad, weight.grad)):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_compiled_backward_kernel_with_a_tensor_parallel_shift_equals_the_eager_one():
    """Under TP the backward's kernel also shifts each label's column (the CPU's TP tests run
    the eager kernel): compiled, the same values, for varying row counts."""
    from megatron_patch.model import output_loss
    generator = torch.Generator().manual_seed(3)
    compiled = output_loss._compiled(output_loss.scaled_gradient)
    for rows in (5, 8):
        kept = torch.rand(rows, VOCAB, generator=generator).to(torch.bfloat16)
        scale, shift = torch.rand(rows, generator=generator), -torch.rand(rows, generator=generator)
        labels = torch.randint(0, VOCAB, (rows,), generator=generator)
        in_shard = torch.rand(rows, generator=generator) > 0.3
        eager = output_loss.scaled_gradient(kept, scale, shift, labels, in_shard)
        assert not torch.equal(eager, output_loss.scaled_gradient(kept, scale, None, labels,
                                                                  in_shard))
        torch.testing.assert_close(compiled(kept, scale, shift, labels, in_shard), eager)


def test_evaluation_without_autograd_gives_the_same_losses():
    hidden, weight, labels, upstream = _inputs()
    expected = _chunked(hidden, weight, labels, upstream, 5)[0]
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(hidden, weight, labels, 5), expected)


def test_only_a_backward_to_come_makes_the_forward_keep_the_logits_gradient(monkeypatch):
    """The kept gradient is tokens x vocab: evaluation (no grad mode, or nothing that needs a
    gradient) must not compute or hold it; training must."""
    from megatron_patch.model import output_loss
    kept, statistics = [], output_loss.softmax_statistics

    def recording(logits, labels, in_shard, keep_gradient):
        kept.append(keep_gradient)
        return statistics(logits, labels, in_shard, keep_gradient)

    monkeypatch.setattr(output_loss, "softmax_statistics", recording)
    hidden, weight, labels, _ = _inputs()
    with torch.no_grad():
        linear_cross_entropy(hidden.requires_grad_(), weight, labels, TOKENS)
    linear_cross_entropy(hidden.detach(), weight, labels, TOKENS)
    linear_cross_entropy(hidden.detach(), weight.requires_grad_(), labels, TOKENS)
    assert kept == [False, False, True]


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients():
    hidden, weight, labels, upstream = _inputs()
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, 5)
    (loss * upstream).sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    (loss * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_a_failing_compiler_names_the_switch_that_avoids_it(monkeypatch):
    from megatron_patch.model import output_loss

    def broken_compile(kernel, dynamic):
        def run(*args):
            raise torch._dynamo.exc.TorchDynamoException("no working C compiler")
        return run

    output_loss._compiled.cache_clear()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        hidden, weight, labels, _ = _inputs()
        with pytest.raises(RuntimeError, match="--loss-chunk-tokens 0"):
            linear_cross_entropy(hidden, weight, labels, 5, compiled=True)
    finally:
        output_loss._compiled.cache_clear()  # the real compiler for the other tests

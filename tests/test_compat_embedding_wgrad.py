"""compat/embedding_wgrad.py: inside ``rows_into_main_grad`` an embedding lookup adds its weight
gradient into ``main_grad`` row by row and marks the weight as megatron's fused linears do; the
lookup's values, and every other lookup, stay torch's. The trainer's step with it runs in
tests/test_compat_wgrad_accumulation.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.compat.embedding_wgrad import rows_into_main_grad

VOCAB, HIDDEN = 50, 16


def _table(dtype=torch.float32, seed=0):
    """An embedding weight as megatron DDP leaves it: an fp32 buffer holding an earlier
    micro-batch's gradient, and the fusion marker unset."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype))
    weight.main_grad = torch.randn(VOCAB, HIDDEN, generator=generator)
    weight.grad_added_to_main_grad = False
    return weight


def _ids_and_upstream(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (3, 7), generator=generator)  # 21 lookups of 8 rows: repeats
    return ids, torch.randn(3, 7, HIDDEN, generator=generator)


def _torch_gradient(weight, ids, upstream):
    reference = weight.detach().clone().requires_grad_()
    (F.embedding(ids, reference) * upstream.to(weight.dtype)).sum().backward()
    return reference.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_goes_into_main_grad_and_the_weight_is_marked(dtype):
    weight = _table(dtype)
    earlier = weight.main_grad.clone()
    ids, upstream = _ids_and_upstream()
    with rows_into_main_grad(weight):
        out = F.embedding(ids, weight)
    assert torch.equal(out, F.embedding(ids, weight.detach()))
    (out * upstream.to(dtype)).sum().backward()
    # each row's repeats summed in fp32 into the fp32 buffer: exact arithmetic to fp32 rounding
    # also for bf16 weights (torch's backward would round each row's sum to bf16 first)
    rows = upstream.to(dtype).double().reshape(-1, HIDDEN)
    exact = earlier.double().index_add_(0, ids.reshape(-1), rows)
    torch.testing.assert_close(weight.main_grad.double(), exact, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert torch.equal(weight.main_grad[untouched], earlier[untouched])
    assert weight.grad_added_to_main_grad is True  # DDP's hook must not add weight.grad
    assert weight.grad is not None and weight.grad.shape == weight.shape  # the placeholder


def test_repeated_rows_sum_exactly_where_the_sum_is_exact():
    """Rows of small integers sum exactly in any order, so repeats must add up to the count."""
    weight = _table()
    weight.main_grad.zero_()
    ids = torch.tensor([[3, 3, 5, 3], [5, 0, 3, 3]])
    with rows_into_main_grad(weight):
        F.embedding(ids, weight).sum().backward()
    expected = torch.zeros(VOCAB)
    expected[[0, 3, 5]] = torch.tensor([1.0, 5.0, 2.0])
    assert torch.equal(weight.main_grad, expected[:, None].expand(VOCAB, HIDDEN))


def test_other_weights_and_lookups_with_options_take_torchs_gradient():
    weight, other = _table(), _table(seed=2)
    before = (weight.main_grad.clone(), other.main_grad.clone())
    ids, upstream = _ids_and_upstream()
    with rows_into_main_grad(weight):
        out = F.embedding(ids, other) + F.embedding(ids, weight, padding_idx=0)
    (out * upstream).sum().backward()
    assert torch.equal(other.main_grad, before[1]) and other.grad_added_to_main_grad is False
    assert torch.equal(weight.main_grad, before[0]) and weight.grad_added_to_main_grad is False
    torch.testing.assert_close(other.grad, _torch_gradient(other, ids, upstream))


@pytest.mark.parametrize("case", ["disabled", "no main_grad", "no grad mode", "frozen"])
def test_without_a_buffer_or_a_backward_the_lookup_is_torchs(case):
    weight = _table()
    earlier = weight.main_grad.clone()
    if case == "no main_grad":
        del weight.main_grad
    if case == "frozen":
        weight.requires_grad_(False)
    ids, upstream = _ids_and_upstream()
    grad_mode = torch.no_grad() if case == "no grad mode" else torch.enable_grad()
    with grad_mode, rows_into_main_grad(weight, enabled=case != "disabled"):
        out = F.embedding(ids, weight)
    assert out.grad_fn is None or type(out.grad_fn).__name__ == "EmbeddingBackward0"
    if out.requires_grad:
        (out * upstream).sum().backward()
        torch.testing.assert_close(weight.grad, _torch_gradient(weight, ids, upstream))
    assert weight.grad_added_to_main_grad is False
    if hasattr(weight, "main_grad"):
        assert torch.equal(weight.main_grad, earlier)


def test_a_vocabulary_shards_masked_lookup_adds_only_its_own_rows():
    """Under TP megatron's VocabParallelEmbedding looks ids outside its shard up as row 0 and
    zeroes those outputs in place afterwards; their gradient must reach no row."""
    shard = _table()  # rows 10..59 of a larger vocabulary
    earlier = shard.main_grad.clone()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 70, (4, 9), generator=generator)
    ids[ids == 10] = 11  # so that row 0 is looked up by out-of-shard ids only
    upstream = torch.randn(4, 9, HIDDEN, generator=generator)
    outside = (ids < 10) | (ids >= 10 + VOCAB)
    local = torch.where(outside, 0, ids - 10)
    with rows_into_main_grad(shard):
        out = F.embedding(local, shard)
    out[outside, :] = 0.0
    (out * upstream).sum().backward()
    exact = earlier.double().index_add_(0, local[~outside], upstream[~outside].double())
    torch.testing.assert_close(shard.main_grad.double(), exact, rtol=1e-6, atol=1e-6)
    assert outside.any()
    assert torch.equal(shard.main_grad[0], earlier[0])

"""DDP's gradient-buffer adds batched into one multi-tensor add per backward
(megatron_patch/compat/ddp_grad_adds.py): megatron's sums bit for bit, in a few launches."""
import contextlib
from unittest import mock

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer import TransformerConfig

from megatron_patch.benchmarking.launch_count import count_launches
from megatron_patch.compat import apply_batched_grad_adds, ddp_grad_adds
from megatron_patch.model import build_model, get_config
from megatron_patch.model.sharding import load_full_state_dict
from test_model_parallel import _micro_batches
from test_model_reference import init_parallel


def _wrapped(cfg, weights, dtype, megatron_hook: bool):
    model = build_model(cfg, attention_backend="local", params_dtype=dtype)
    load_full_state_dict(model, weights)
    hook = (mock.patch.object(DistributedDataParallel, "_make_backward_post_hook",
                              ddp_grad_adds.MEGATRON_HOOK) if megatron_hook
            else contextlib.nullcontext())
    with hook:
        return DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True), model)


def _backward(ddp, batch) -> None:
    batch = dict(batch)
    mask = batch.pop("loss_mask")
    (ddp(**batch) * mask).sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_adds_give_megatrons_gradient_buffers_bit_for_bit(dtype):
    """Two micro-batches into the fp32 buffers of the tiny model: the batched adds (bf16
    gradients converted in one piece) leave exactly what megatron's per-parameter hook does,
    and nothing is left pending after a backward."""
    apply_batched_grad_adds()
    init_parallel(1, 1, seed=4)
    cfg = get_config("tiny")
    weights = {name: p.detach().clone() for name, p in build_model(
        cfg, attention_backend="local").named_parameters()}
    theirs = _wrapped(cfg, weights, dtype, megatron_hook=True)
    ours = _wrapped(cfg, weights, dtype, megatron_hook=False)
    for batch in _micro_batches(cfg):
        for ddp in (theirs, ours):
            _backward(ddp, batch)
        assert not ddp_grad_adds._pending
    pairs = list(zip(theirs.module.named_parameters(), ours.module.parameters()))
    assert all(p.grad is None and q.grad is None for (_, p), q in pairs)
    for (name, reference), batched in pairs:
        assert reference.main_grad.abs().sum() > 0, name
        assert torch.equal(batched.main_grad, reference.main_grad), name


def test_a_backward_adds_its_kept_gradients_in_a_few_launches():
    """The tiny model's backward: megatron's hook launches one add per parameter; the batched
    hook one conversion, one concatenation and one multi-tensor add for all of them."""
    apply_batched_grad_adds()
    init_parallel(1, 1, seed=4)
    cfg = get_config("tiny")
    weights = {name: p.detach().clone() for name, p in build_model(
        cfg, attention_backend="local").named_parameters()}
    batch = _micro_batches(cfg)[0]
    counts = {}
    for megatron_hook in (True, False):
        ddp = _wrapped(cfg, weights, torch.bfloat16, megatron_hook)
        _backward(ddp, batch)  # the second backward accumulates, as every later micro-batch
        counts[megatron_hook], _ = count_launches(lambda: _backward(ddp, batch))
    parameters = sum(1 for _ in ddp.module.parameters())
    megatron, batched = counts[True], counts[False]
    assert megatron["aten::add_"] - batched["aten::add_"] == parameters
    assert batched["aten::_foreach_add_"] == 1 and batched["aten::cat"] - megatron["aten::cat"] == 1
    assert sum(megatron.values()) - sum(batched.values()) == parameters - 3


def test_kept_gradients_are_added_before_the_buffer_is_reduced_or_zeroed():
    """A gradient kept inside a backward (the callback at its end not yet run) reaches the
    buffer before a bucket's reduction starts and before the buffer is zeroed; a large one is
    added at once; outside a backward every add is immediate."""
    apply_batched_grad_adds()
    init_parallel(1, 1, seed=4)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), module)
    param = next(ddp.module.parameters())
    grad = torch.ones_like(param)
    with mock.patch.object(ddp_grad_adds, "_backward_task", lambda: 7), \
            mock.patch.object(ddp_grad_adds, "_at_backward_end", lambda callback: None):
        ddp_grad_adds.add_to_buffer(param.main_grad, grad)
        assert param.main_grad.abs().sum() == 0 and len(ddp_grad_adds._pending) == 1
        ddp.bucket_groups[0].start_grad_sync()
        assert torch.equal(param.main_grad, grad) and not ddp_grad_adds._pending
        ddp_grad_adds.add_to_buffer(param.main_grad, grad)
        ddp.zero_grad_buffer()
        assert not ddp_grad_adds._pending and param.main_grad.abs().sum() == 0
        with mock.patch.object(ddp_grad_adds, "SMALL_GRADIENT_ELEMENTS", 1):
            ddp_grad_adds.add_to_buffer(param.main_grad, grad)
        assert torch.equal(param.main_grad, grad) and not ddp_grad_adds._pending
    ddp_grad_adds.add_to_buffer(param.main_grad, grad)  # no backward running
    assert torch.equal(param.main_grad, 2 * grad) and not ddp_grad_adds._pending

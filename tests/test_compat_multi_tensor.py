"""compat/multi_tensor.py: megatron's per-tensor optimizer fallbacks (no TE/APEX) replaced by
torch's multi-tensor kernels for CUDA tensors, megatron's own code kept for CPU tensors."""
import pytest
import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads, optimizer

from megatron_patch.compat import apply_cpu_redirects, multi_tensor


def tensors(seed, dtype=torch.float32, count=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 5, generator=g).to(dtype) for i in range(count)]


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    """The foreach path on CPU tensors (the ops are the same on both devices)."""
    monkeypatch.setattr(multi_tensor, "_on_gpu", lambda tensors: bool(tensors))


def test_installed_where_megatron_fell_back():
    multi_tensor.apply()
    for module, attribute in ((clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                              (optimizer, "multi_tensor_scale_impl"),
                              (optimizer, "_multi_tensor_copy_this_to_that")):
        assert getattr(module, attribute).__module__ == multi_tensor.__name__, attribute


def test_cpu_tensors_keep_megatrons_code(monkeypatch):
    calls = []
    norm = multi_tensor.l2_norm(lambda *args: calls.append("megatron") or ("norm", None))
    assert norm(2048, None, [tensors(0)], False) == ("norm", None) and calls == ["megatron"]


def test_gradient_norm_is_megatrons_without_a_host_sync(as_if_on_gpu, monkeypatch):
    apply_cpu_redirects()  # megatron's function puts its result on 'cuda'
    grads = tensors(1)
    want, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__float__", no_sync)
    got, per_tensor = multi_tensor.l2_norm(utils.local_multi_tensor_l2_norm)(
        2048, None, [grads], False)
    assert per_tensor is None and got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)


def test_scaling_and_copying_are_megatrons(as_if_on_gpu):
    scale = multi_tensor.scale(utils.local_multi_tensor_scale)
    # clipping: in place
    grads, expected = tensors(2), tensors(2)
    utils.local_multi_tensor_scale(2048, None, [expected, expected], 0.37)
    scale(2048, None, [grads, grads], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    # fp32 master weights into bf16 model weights
    master = tensors(3)
    model, expected = tensors(4, torch.bfloat16), tensors(4, torch.bfloat16)
    utils.local_multi_tensor_scale(2048, None, [master, expected], 1.0)
    scale(2048, None, [master, model], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(model, expected))
    # any other scale into other tensors
    targets, expected = tensors(5), tensors(5)
    utils.local_multi_tensor_scale(2048, None, [master, expected], 2.5)
    scale(2048, None, [master, targets], 2.5)
    assert all(torch.equal(a, b) for a, b in zip(targets, expected))


def test_bf16_master_weight_copy_is_one_launch_with_megatrons_values(as_if_on_gpu):
    """megatron copies fp32 master weights into bf16 weights one copy_ per tensor (no overflow
    buffer for bf16, so the multi-tensor kernel is never asked): one foreach copy instead."""
    from megatron_patch.benchmarking.launch_count import count_launches

    def megatrons_loop(this, that, overflow_buf=None):
        raise AssertionError("the per-tensor loop ran")

    master = tensors(8)
    model, expected = tensors(9, torch.bfloat16), tensors(9, torch.bfloat16)
    for source, target in zip(master, expected):  # what megatron's loop does
        target.copy_(source)
    launches, _ = count_launches(
        lambda: multi_tensor.copy_this_to_that(megatrons_loop)(master, model, None))
    assert sum(launches.values()) == 1, launches
    assert all(torch.equal(a, b) for a, b in zip(model, expected))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (`pytest -m gpu`)")
def test_on_cuda_the_foreach_kernels_give_megatrons_values():
    grads = [t.cuda() for t in tensors(6, count=40)]
    want, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    got, _ = multi_tensor.l2_norm(utils.local_multi_tensor_l2_norm)(2048, None, [grads], False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    master = [t.cuda() for t in tensors(7, count=40)]
    model = [torch.empty_like(t, dtype=torch.bfloat16) for t in master]
    multi_tensor.scale(utils.local_multi_tensor_scale)(2048, None, [master, model], 1.0)
    assert all(torch.equal(m, w.to(torch.bfloat16)) for m, w in zip(model, master))
    model = [torch.empty_like(t, dtype=torch.bfloat16) for t in master]
    multi_tensor.copy_this_to_that(optimizer._multi_tensor_copy_this_to_that)(master, model, None)
    assert all(torch.equal(m, w.to(torch.bfloat16)) for m, w in zip(model, master))

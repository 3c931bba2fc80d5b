"""compat/bias_gelu.py: on a GPU the vision MLP's fc1 bias and exact GELU are one compiled
function with megatron's result; every other MLP and the CPU run megatron's forward."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.compat import bias_gelu
from megatron_patch.model import build_model, get_config
from test_model_packed_rope import parameter_gradients, two_packed_samples
from test_model_reference import init_parallel


def eager_gpu_path(on_gpu: bool, calls: list):
    """The GPU's choice on the CPU (if ``on_gpu``), the compiled function run eagerly: the same
    operators as megatron's unfused bias add and GELU, so the same bits."""
    def eager():
        calls.append(1)
        return bias_gelu.bias_gelu

    return (mock.patch.object(bias_gelu, "_on_gpu", lambda x: on_gpu),
            mock.patch.object(bias_gelu, "compiled_bias_gelu", eager))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_vision_mlp_takes_it_with_megatrons_gradients(dtype):
    """With the fused kernels (the GPU default): one call per vision layer and the gradients of
    megatron's unfused MLP bit for bit; the language model's SwiGLU MLPs never take it."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local", fused_kernels=True,
                        params_dtype=dtype).train()
    inputs = two_packed_samples(cfg, seed=5)
    results, calls = [], []
    for on_gpu in (False, True):
        on_gpu_patch, compiled_patch = eager_gpu_path(on_gpu, calls)
        with on_gpu_patch, compiled_patch:
            results.append(parameter_gradients(model, inputs))
    assert len(calls) == cfg.vision.num_layers
    megatrons, fused = results
    assert megatrons.keys() == fused.keys()
    for name in megatrons:
        assert torch.equal(fused[name], megatrons[name]), name


def test_megatrons_forward_runs_without_the_fused_kernels():
    """--no-bias-swiglu-fusion (fused_kernels=False): megatron's forward on the GPU too."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    inputs = two_packed_samples(cfg, seed=6)
    calls = []
    on_gpu_patch, compiled_patch = eager_gpu_path(True, calls)
    with on_gpu_patch, compiled_patch:
        build_model(cfg, attention_backend="local", fused_kernels=False)(*inputs[0], **inputs[1])
    assert calls == []


def test_the_compiled_function_computes_exact_gelu():
    """What a GPU compiles, built here by the CPU's inductor, for two token counts: the exact
    (erf) GELU of the biased input, not the tanh approximation, and its gradients (fp32)."""
    generator = torch.Generator().manual_seed(7)
    bias = torch.randn(64, generator=generator, requires_grad=True)
    for rows in (37, 53):
        x = torch.randn(rows, 1, 64, generator=generator, requires_grad=True) * 3
        results = []
        for run in (lambda x, b: F.gelu(x + b), bias_gelu.compiled_bias_gelu()):
            out = run(x, bias)
            results.append((out, *torch.autograd.grad(out.square().sum(), (x, bias))))
        wanted, computed = results
        for got, want in zip(computed, wanted):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tanh = F.gelu(x + bias, approximate="tanh")
        assert (computed[0] - tanh).abs().max() > 1e-4  # the approximation would show

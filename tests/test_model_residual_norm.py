"""Each residual add and the norm after it as one compiled kernel on a GPU
(model/residual_norm.py). The CPU keeps megatron's path. Here the compiled functions run
through the CPU's inductor build, and for the routing a stand-in counts the calls a GPU would
compile."""
from __future__ import annotations

import pytest
import torch
from megatron.core.fusions.fused_bias_dropout import (bias_dropout_add_fused_train,
                                                      bias_dropout_add_unfused,
                                                      get_bias_dropout_add)

from megatron_patch.model import build_model, get_config, norms, residual_norm
from test_model_norms import compiled_and_plain_models, counting_compiler
from test_model_packed_rope import parameter_gradients, two_packed_samples
from test_model_reference import init_parallel


def _fused_adds(model):
    """(layers whose attention's add is fused, whose MLP's add is), both towers."""
    layers = [*model.language_model.decoder.layers, *model.vision_model.decoder.layers]
    return ([isinstance(layer.self_attn_bda, residual_norm.ResidualThenNorm) for layer in layers],
            [isinstance(layer.mlp_bda, residual_norm.ResidualThenNorm) for layer in layers])


def test_each_residual_add_and_the_norm_after_it_run_in_one_call(monkeypatch):
    """On GPU tensors (said yes to here) every residual add of both towers computes the sum and
    the norm that reads it next in one compiled function: the pre-MLP norm, the next layer's
    input norm, the language model's final norm (the vision tower has none after its last
    layer). The norm takes that output instead of computing again: the same losses and
    gradients, to the bit (fp32), as megatron's adds and torch's norms. Without compiled norms
    (the CPU) megatron's adds stay."""
    cfg = get_config("tiny")
    fused, plain = compiled_and_plain_models(cfg)
    language, vision = cfg.language.num_layers, cfg.vision.num_layers
    attention_adds, mlp_adds = _fused_adds(fused)
    assert all(attention_adds) and mlp_adds == [True] * (language + vision - 1) + [False]
    assert not any(sum(_fused_adds(plain), []))

    calls = []
    for module in (norms, residual_norm):
        monkeypatch.setattr(module, "_on_gpu", lambda x: True)
        monkeypatch.setattr(module, "compiled", counting_compiler(calls))
    inputs = two_packed_samples(cfg, seed=2)
    want, got = parameter_gradients(plain, inputs), parameter_gradients(fused, inputs)
    assert calls.count("add_rms_norm") == 2 * language
    assert calls.count("add_layer_norm") == 2 * vision - 1
    # on their own: the first layer's input norm of each tower, the q/k norms
    assert calls.count("rms_norm") == 2 * language + 1, calls
    assert calls.count("layer_norm") == 1, calls
    norms_handed_to = [m for m in fused.modules() if isinstance(m, norms._HandedOver)]
    assert all(norm._handed is None for norm in norms_handed_to)  # nothing held
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def _stream(bias: bool, dtype, device="cpu", tokens=300, width=64):
    """The fused function's arguments, the same values for every dtype: the attention's output,
    its bias, the residual, the norm's weight and bias (the biases for the vision tower)."""
    generator = torch.Generator().manual_seed(1)
    values = [torch.randn(tokens, 1, width, generator=generator),  # the attention's output
              torch.randn(width, generator=generator) if bias else None,
              3 * torch.randn(tokens, 1, width, generator=generator),  # the residual
              torch.rand(width, generator=generator) + 0.5,  # the norm's weight and bias
              torch.randn(width, generator=generator) if bias else None]
    return [None if v is None else v.to(device, dtype).requires_grad_() for v in values]


def _fused(branch, bias, residual, weight, norm_bias):
    if norm_bias is None:
        return residual_norm.compiled(residual_norm.add_rms_norm)(branch, bias, residual,
                                                                  weight, 1e-6)
    return residual_norm.compiled(residual_norm.add_layer_norm)(branch, bias, residual, weight,
                                                                norm_bias, 1e-5)


def _megatrons(branch, bias, residual, weight, norm_bias):
    """megatron's bias-dropout-add as each tower runs it on a GPU (the language model's without
    a bias is an eager add, the vision tower's compiled), then the compiled norm."""
    if bias is None:
        total = bias_dropout_add_unfused(True)((branch, None), residual, 0.0)
        return total, norms.compiled(norms.rms_norm)(total, weight, 1e-6)
    total = bias_dropout_add_fused_train((branch, bias), residual, 0.0)
    return total, norms.compiled(norms.layer_norm)(total, weight, norm_bias, 1e-5)


def _exact(branch, bias, residual, weight, norm_bias):
    total = residual + (branch if bias is None else branch + bias)
    if norm_bias is None:
        return total, norms.rms_norm(total, weight, 1e-6)
    return total, norms.layer_norm(total, weight, norm_bias, 1e-5)


def _values_and_gradients(function, bias: bool, dtype, **stream):
    leaves = _stream(bias, dtype, **stream)
    total, normalized = function(*leaves)
    generator = torch.Generator().manual_seed(2)
    incoming = [torch.randn(total.shape, generator=generator).to(total) for _ in range(2)]
    torch.autograd.backward([total, normalized], incoming)
    return [total, normalized] + [leaf.grad for leaf in leaves if leaf is not None]


def check_against_megatron_and_float64(bias: bool, same_norm_bits: bool, **stream) -> None:
    """The fused kernel in bf16: the sum equal to megatron's add bit for bit (both round an
    fp32 sum once), the normalised sum equal to the compiled norm's (``same_norm_bits``) or
    within a bf16 rounding of it; the gradients, whose two parts are added in fp32 before one
    rounding, within bf16's rounding of float64 and not far from the unfused path's error."""
    got = _values_and_gradients(_fused, bias, torch.bfloat16, **stream)
    unfused = _values_and_gradients(_megatrons, bias, torch.bfloat16, **stream)
    exact = _values_and_gradients(_exact, bias, torch.float64, **stream)
    assert torch.equal(got[0], unfused[0])
    if same_norm_bits:
        assert torch.equal(got[1], unfused[1])
    else:
        torch.testing.assert_close(got[1], unfused[1], rtol=2 ** -7, atol=2 ** -7)
    for name, mine, theirs, reference in zip(
            ("branch", "bias", "residual", "weight", "norm bias") if bias
            else ("branch", "residual", "weight"), got[2:], unfused[2:], exact[2:]):
        scale = reference.abs().max()
        error = (mine.double() - reference).abs().max() / scale
        assert error < 2 ** -7, (name, float(error))
        assert error <= 2 * (theirs.double() - reference).abs().max() / scale + 2 ** -9, name


@pytest.mark.parametrize("bias", [False, True], ids=["language (rms)", "vision (bias, layer)"])
def test_the_compiled_kernel_gives_megatrons_values_and_float64s_gradients(bias):
    """What a GPU compiles, built by the CPU's inductor, in bf16 (the norm reading the sum as
    rounded: bit for bit the unfused path's forward)."""
    check_against_megatron_and_float64(bias, same_norm_bits=True)


def test_the_norm_takes_a_handed_output_only_for_that_tensor_and_once():
    norm = norms.CompiledRMSNorm(8, eps=1e-6)
    total, other = torch.randn(4, 8), torch.randn(4, 8)
    marker = torch.full((4, 8), 7.0)
    norm.hand_over(total, marker)
    assert norm(total) is marker
    torch.testing.assert_close(norm(total), torch.nn.functional.rms_norm(total, (8,), norm.weight,
                                                                         1e-6))  # taken once
    norm.hand_over(total, marker)
    torch.testing.assert_close(norm(other), torch.nn.functional.rms_norm(other, (8,), norm.weight,
                                                                         1e-6))
    assert norm._handed is None  # a hand-over not taken is dropped, not held


def test_megatrons_add_for_dropout_while_training_and_cpu_tensors(monkeypatch):
    """Neither tower has dropout, but the function must not drop it."""
    init_parallel(1, 1)
    norm = norms.CompiledRMSNorm(8, eps=1e-6)
    bda = residual_norm.ResidualThenNorm(norm)
    branch, residual = torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    torch.testing.assert_close(bda(True, False)((branch, None), residual, 0.0), residual + branch)
    assert norm._handed is None  # CPU tensors: megatron's add
    monkeypatch.setattr(residual_norm, "_on_gpu", lambda x: True)
    torch.manual_seed(0)
    dropped = bda(True, False)((branch, None), residual, 0.5)
    assert norm._handed is None and (dropped == residual).any()  # some elements dropped
    assert torch.equal(bda(False, False)((branch, None), residual, 0.5), residual + branch)
    assert norm._handed is not None  # evaluation: dropout is off, so the fused kernel runs


def test_which_adds_are_handed_over_under_recompute_offloading_and_cuda_graphs():
    """A recomputed or offloaded norm (megatron wraps its call) keeps megatron's add. Under full
    recompute, and with CUDA graphs, the MLP's add is not handed to the next layer: a chunk's or
    a graph's last layer would hand it out of the chunk or graph. The attention's add, within
    the layer, still is."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    selective = build_model(cfg, attention_backend="local", norm_fusion=True,
                            recompute_granularity="selective", recompute_modules=["layernorm"])
    attention_adds, mlp_adds = _fused_adds(selective)
    language = cfg.language.num_layers  # only the final norm, which is not recomputed, takes one
    assert not any(attention_adds)
    assert mlp_adds == [index == language - 1 for index in range(len(mlp_adds))]
    full = build_model(cfg, attention_backend="local", norm_fusion=True,
                       recompute_granularity="full", recompute_method="uniform",
                       recompute_num_layers=1)
    attention_adds, mlp_adds = _fused_adds(full)
    assert all(attention_adds) and not any(mlp_adds)

    def handed_over(block):
        """(attention's, MLP's) adds of each layer handed over, after megatron's are restored."""
        for layer in block.layers:
            layer.self_attn_bda = layer.mlp_bda = get_bias_dropout_add
        residual_norm.fuse_residual_adds(block)
        return [(isinstance(layer.self_attn_bda, residual_norm.ResidualThenNorm),
                 isinstance(layer.mlp_bda, residual_norm.ResidualThenNorm))
                for layer in block.layers]

    model = build_model(cfg, attention_backend="local", norm_fusion=True)
    block = model.language_model.decoder
    # megatron's activation offloading may stand another tensor in for the sum: a layer that
    # offloads keeps megatron's adds, and so does the layer before it for the MLP's add
    block.layers[1].offload_mlp_norm = True
    assert handed_over(block) == [(True, False), (False, False), (True, True), (True, True)]
    block.layers[1].offload_mlp_norm = False
    block.config.cuda_graph_impl = "local"
    assert handed_over(block) == [(True, False)] * len(block.layers)

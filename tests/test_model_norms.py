"""The decoder layers' norms (model/norms.py): torch's modules, compiled on a GPU. The CPU keeps
torch's kernels; here the compiled functions run through the CPU's inductor build and, for the
routing, a stand-in counts the calls a GPU would compile."""
from __future__ import annotations

import pytest
import torch

from megatron_patch.model import build_model, get_config
from megatron_patch.model import norms
from test_model_packed_rope import parameter_gradients, two_packed_samples
from test_model_reference import init_parallel


def _decoder_norms(model):
    language = model.language_model.decoder
    vision = model.vision_model.decoder
    per_layer = [(layer.input_layernorm, layer.pre_mlp_layernorm,
                  layer.self_attention.q_layernorm, layer.self_attention.k_layernorm)
                 for layer in language.layers]
    rms = [norm for layer in per_layer for norm in layer] + [language.final_layernorm]
    layer_norms = [norm for layer in vision.layers
                   for norm in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    return rms, layer_norms


def compiled_and_plain_models(cfg):
    """The tiny model twice with the same weights: with the GPU's compiled norms
    (``norm_fusion``) and without."""
    init_parallel(1, 1)
    models = []
    for norm_fusion in (True, False):
        torch.manual_seed(0)
        models.append(build_model(cfg, attention_backend="local",
                                  norm_fusion=norm_fusion).train())
    return models


def counting_compiler(calls: list):
    """A stand-in for a module's ``compiled`` factory: the function itself, each call's name
    recorded in ``calls``."""
    def compiled(function):
        def call(*args):
            calls.append(function.__name__)
            return function(*args)
        return call
    return compiled


def test_every_decoder_norm_is_compiled_on_a_gpu(monkeypatch):
    """``norm_fusion`` (the GPU default): every RMSNorm of the language model and LayerNorm of the
    vision tower's layers takes the compiled function on GPU tensors (a counting stand-in here),
    with the same losses and gradients as torch's modules; without it they are torch's own
    classes. Names, and so checkpoints, are the same either way."""
    cfg = get_config("tiny")
    fused, plain = compiled_and_plain_models(cfg)
    rms, layer_norms = _decoder_norms(fused)
    assert all(type(norm) is norms.CompiledRMSNorm for norm in rms)
    assert all(type(norm) is norms.CompiledLayerNorm for norm in layer_norms)
    plain_rms, plain_layer_norms = _decoder_norms(plain)
    assert all(type(norm) is torch.nn.RMSNorm for norm in plain_rms)
    assert all(type(norm) is torch.nn.LayerNorm for norm in plain_layer_norms)
    assert fused.state_dict().keys() == plain.state_dict().keys()

    calls = []
    monkeypatch.setattr(norms, "_on_gpu", lambda x: True)
    monkeypatch.setattr(norms, "compiled", counting_compiler(calls))
    inputs = two_packed_samples(cfg, seed=2)
    want, got = parameter_gradients(plain, inputs), parameter_gradients(fused, inputs)
    assert calls.count("rms_norm") == len(rms) == 4 * cfg.language.num_layers + 1
    assert calls.count("layer_norm") == len(layer_norms) == 2 * cfg.vision.num_layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_the_compiled_norms_compute_torchs_norms():
    """What a GPU compiles, built here by the CPU's inductor: torch's RMSNorm and LayerNorm,
    forward and gradients, to float rounding (fp32)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(37, 3, 64, generator=generator, requires_grad=True)
    weight = torch.randn(64, generator=generator, requires_grad=True)
    bias = torch.randn(64, generator=generator, requires_grad=True)
    for function, args in ((norms.rms_norm, (x, weight, 1e-6)),
                           (norms.layer_norm, (x, weight, bias, 1e-5))):
        tensors = [arg for arg in args if torch.is_tensor(arg)]
        results = []
        for run in (function, norms.compiled(function)):
            out = run(*args)
            results.append((out, torch.autograd.grad(out.square().sum(), tensors)))
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_an_unknown_normalization_is_refused():
    init_parallel(1, 1)
    config = get_config("tiny")
    from megatron_patch.model.transformer_configs import language_transformer_config
    transformer_config = language_transformer_config(config)
    transformer_config.normalization = "ScaleNorm"
    with pytest.raises(ValueError, match="'ScaleNorm' is not one of"):
        norms.TorchNorm(transformer_config, 64)

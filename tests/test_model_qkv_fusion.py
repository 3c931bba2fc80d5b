"""model/qkv_fusion.py: on a GPU each self-attention layer of both towers prepares its query, key
and value (split, q/k norms, RoPE, contiguous value) in one compiled function, with megatron's
result; everywhere else megatron's own code runs."""
import contextlib
from unittest import mock

import pytest
import torch

from megatron_patch.compat import packed_rope
from megatron_patch.compat.packed_rope import rotate
from megatron_patch.model import build_model, get_config, norms, qkv_fusion, residual_norm
from megatron_patch.model.qkv_fusion import FusedQKVSelfAttention, compiled_preparation, prepare_qkv
from test_model_packed_rope import parameter_gradients, two_packed_samples
from test_model_reference import init_parallel


@contextlib.contextmanager
def eager_gpu_paths(fused_preparation: bool, calls: list):
    """The GPU's choices on the CPU, every kernel eager (the same operators, so the same bits):
    the compiled norms (with the residual adds before them) and rotation, and the fused
    preparation if ``fused_preparation``, whose
    calls are recorded by shape (heads per group, head dim)."""

    def eager_preparation(heads_per_group, head_dim, eps, mscale):
        def prepare(*args):
            calls.append((heads_per_group, head_dim))
            return prepare_qkv(*args, heads_per_group=heads_per_group, head_dim=head_dim,
                               eps=eps, mscale=mscale)
        return prepare

    with contextlib.ExitStack() as stack:
        for module in (packed_rope, norms, residual_norm):
            stack.enter_context(mock.patch.object(module, "_on_gpu", lambda x: True))
        for module in (norms, residual_norm):
            stack.enter_context(mock.patch.object(module, "compiled", lambda function: function))
        stack.enter_context(mock.patch.object(packed_rope, "fused_rotation", lambda: rotate))
        stack.enter_context(mock.patch.object(qkv_fusion, "_on_gpu",
                                              lambda x: fused_preparation))
        stack.enter_context(mock.patch.object(qkv_fusion, "compiled_preparation",
                                              eager_preparation))
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_attention_layer_prepares_in_one_call_with_megatrons_result(dtype):
    """Both towers' packed forward and backward: the fused preparation runs once per attention
    layer and, running the same operators, gives the separate kernels' gradients bit for bit.
    Except the vision tower's learned rotary angle, whose gradients from the query and the key
    add up in another order: equal to rounding."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local", rope_fusion=True, norm_fusion=True,
                        params_dtype=dtype).train()
    attentions = [m for m in model.modules() if isinstance(m, FusedQKVSelfAttention)]
    assert len(attentions) == cfg.language.num_layers + cfg.vision.num_layers
    inputs = two_packed_samples(cfg, seed=3)
    results, calls = [], []
    for fused in (False, True):
        with eager_gpu_paths(fused, calls):
            results.append(parameter_gradients(model, inputs))
    language = (cfg.language.num_attention_heads // cfg.language.num_query_groups,
                cfg.language.head_dim)
    vision = (1, cfg.vision.head_dim)
    assert sorted(calls) == sorted([language] * cfg.language.num_layers
                                   + [vision] * cfg.vision.num_layers)
    separate, fused = results
    assert separate.keys() == fused.keys()
    angle = "vision_model.class_pos_emb"
    torch.testing.assert_close(fused.pop(angle), separate.pop(angle),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    for name in separate:
        assert torch.equal(fused[name], separate[name]), name


def test_megatrons_code_runs_where_the_separate_kernels_would_not():
    """No fused preparation on the CPU, nor with --no-rope-fusion; with --no-norm-fusion only
    the vision tower (no q/k norms) keeps it."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    inputs = two_packed_samples(cfg, seed=4)
    calls = []
    for on_gpu, rope_fusion, norm_fusion, layers in (
            (False, True, True, 0), (True, False, True, 0),
            (True, True, False, cfg.vision.num_layers)):
        calls.clear()
        with eager_gpu_paths(True, calls), mock.patch.object(qkv_fusion, "_on_gpu",
                                                             lambda x: on_gpu):
            build_model(cfg, attention_backend="local", rope_fusion=rope_fusion,
                        norm_fusion=norm_fusion)(*inputs[0], **inputs[1])
        assert len(calls) == layers, (on_gpu, rope_fusion, norm_fusion)
        assert all(shape == (1, cfg.vision.head_dim) for shape in calls)


def test_the_compiled_preparation_computes_the_eager_one():
    """What a GPU compiles, built here by the CPU's inductor, for two token counts (the vision
    tower's vary): queries, keys and values, and the gradients of the projection's output, its
    bias, the norm weights and learned angles, to float rounding (fp32)."""
    generator = torch.Generator().manual_seed(5)
    heads_per_group, head_dim, groups = 2, 16, 3
    width = groups * (heads_per_group + 2) * head_dim
    norm_weights = [torch.randn(head_dim, generator=generator, requires_grad=True)
                    for _ in range(2)]
    bias = torch.randn(width, generator=generator, requires_grad=True)
    compiled = compiled_preparation(heads_per_group, head_dim, 1e-6, 1.0)
    for rows in (37, 53):
        mixed = torch.randn(rows, 1, width, generator=generator, requires_grad=True)
        angles = torch.randn(rows, 1, 1, head_dim, generator=generator, requires_grad=True)
        inputs = (mixed, angles, bias, *norm_weights)
        results = []
        for run in (lambda *a: prepare_qkv(*a, heads_per_group=heads_per_group,
                                           head_dim=head_dim, eps=1e-6, mscale=1.0), compiled):
            query, key, value = run(*inputs)
            loss = query.square().sum() + key.sum() + (value * value.detach()).sum()
            results.append(((query, key, value), torch.autograd.grad(loss, inputs)))
        (want, want_grads), (got, got_grads) = results
        assert [t.shape for t in got] == [(rows, 1, groups * heads_per_group, head_dim),
                                          (rows, 1, groups, head_dim), (rows, 1, groups, head_dim)]
        assert all(t.is_contiguous() for t in got)
        for a, b in zip((*got, *got_grads), (*want, *want_grads)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

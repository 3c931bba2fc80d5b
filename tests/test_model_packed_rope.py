"""compat/packed_rope.py: packed-sequence RoPE with one angle per token (and no gradient for the
angles) is rotated in one pass, without megatron's per-segment host reads, and gives megatron's
result bit for bit. The towers' packed forwards against independent references
(test_model_language, test_model_vision) run through it too."""
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_patch.compat import packed_rope
from megatron_patch.compat.packed_rope import per_token_rotation, rotate
from megatron_patch.model import build_model, get_config
from test_model_reference import image_batch, init_parallel

CONFIG = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                         multi_latent_attention=False)
ONE_RANK = SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # a context-parallel group of one
CU = torch.tensor([0, 5, 13, 16], dtype=torch.int32)


def rope_inputs(positions: int):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(int(CU[-1]), 3, 8, generator=g, requires_grad=True)
    freqs = torch.randn(positions, 1, 1, 8, generator=g)
    return t, freqs


def two_packed_samples(cfg, seed: int = 0):
    """A packed forward's arguments: two samples of 10 and 14 tokens, one image each."""
    ids, pixels, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 6)], 24, [0, 0], seed=seed)
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=14, max_seqlen_kv=14)
    return (ids, positions), dict(pixel_values=pixels, image_grid_thw=grid,
                                  packed_seq_params=packed)


def parameter_gradients(model, inputs) -> dict:
    args, kwargs = inputs
    model.zero_grad(set_to_none=True)
    (model(*args, **kwargs).float() ** 2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("positions", [16, 13], ids=["angle per token", "angle per position"])
def test_same_rotation_and_gradient_as_megatron(positions):
    """Per token (our towers): the fast path; per position (megatron's other layout): megatron's
    own function. Both equal megatron's result exactly."""
    fast = per_token_rotation(rope_utils.apply_rotary_pos_emb)
    results = []
    for function in (rope_utils.apply_rotary_pos_emb, fast):
        t, freqs = rope_inputs(positions)
        out = function(t, freqs, CONFIG, cu_seqlens=CU, cp_group=ONE_RANK)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out) / out.numel())
        results.append((out.detach(), t.grad))
    (want, want_grad), (got, got_grad) = results
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_only_the_per_token_case_skips_megatron():
    calls = []
    fast = per_token_rotation(lambda *args, **kwargs: calls.append(kwargs) or "megatron")
    t, freqs = rope_inputs(16)
    assert isinstance(fast(t, freqs, CONFIG, cu_seqlens=CU, cp_group=ONE_RANK), torch.Tensor)
    two_ranks = SimpleNamespace(size=lambda: 2, rank=lambda: 0)
    assert fast(t, freqs, CONFIG, cu_seqlens=CU, cp_group=two_ranks) == "megatron"
    assert fast(t, freqs, SimpleNamespace(**{**vars(CONFIG), "apply_rope_fusion": True}),
                cu_seqlens=CU, cp_group=ONE_RANK) == "megatron"
    assert fast(t, freqs[:13], CONFIG, cu_seqlens=CU, cp_group=ONE_RANK) == "megatron"
    # learned angles (a trainable vision tower's class token): megatron's gradient order
    assert fast(t, freqs.requires_grad_(), CONFIG, cu_seqlens=CU, cp_group=ONE_RANK) == "megatron"
    assert len(calls) == 4


def test_both_towers_take_the_fast_path(monkeypatch):
    """A packed language-model forward and the vision tower (images packed as segments, its
    angles without gradient here) never reach megatron's per-segment function."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    model = build_model(cfg, attention_backend="local").eval()

    def per_segment(*args, **kwargs):
        raise AssertionError("megatron's per-segment packed RoPE was called")

    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_thd", per_segment)
    args, kwargs = two_packed_samples(cfg)
    with torch.no_grad():
        logits = model(*args, **kwargs)
    assert logits.shape[:2] == (1, 24) and torch.isfinite(logits).all()


def test_training_gradients_equal_megatrons_bit_for_bit(monkeypatch):
    """Every parameter's gradient, the vision tower's learned class-token angle included, is
    what megatron's own RoPE gives: a trainer's trajectory does not move (the demo's accuracy
    depends on it to the last bit)."""
    from megatron.core.transformer import attention

    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local").train()
    inputs = two_packed_samples(cfg, seed=1)
    gradients = []
    for rope in (attention.apply_rotary_pos_emb, rope_utils.apply_rotary_pos_emb):
        monkeypatch.setattr(attention, "apply_rotary_pos_emb", rope)
        gradients.append(parameter_gradients(model, inputs))
    ours, megatrons = gradients
    assert ours.keys() == megatrons.keys() and "vision_model.class_pos_emb" in ours
    assert [name for name in ours if not torch.equal(ours[name], megatrons[name])] == []


@pytest.mark.parametrize("layout", ["packed", "sbhd"])
def test_the_gpu_rotation_computes_megatrons_rope(layout):
    """``rotate`` (compiled on a GPU) is megatron's rotation: bit for bit in fp32, within one
    bf16 rounding in bf16 (it rounds once, megatron after every operation); gradients too, the
    angles' included (in fp32 to rounding where they are summed over a batch and heads: rotated
    half by half, the sums run in another order)."""
    g = torch.Generator().manual_seed(3)
    shape = (16, 3, 8) if layout == "packed" else (16, 2, 3, 8)
    t = torch.randn(shape, generator=g)
    freqs = torch.randn(16, 1, 1, 8, generator=g)
    angles = freqs.squeeze(1) if layout == "packed" else freqs
    probe = torch.randn(shape, generator=g)

    def megatron(x, f):
        x = x.unsqueeze(1) if layout == "packed" else x
        out = rope_utils._apply_rotary_pos_emb_bshd(x, f, rotary_interleaved=False)
        return out.squeeze(1) if layout == "packed" else out

    for dtype in (torch.float32, torch.bfloat16):
        results = []
        for function, f in ((megatron, freqs), (rotate, angles)):
            x = t.to(dtype).requires_grad_()
            f = f.clone().requires_grad_()
            out = function(x, f)
            grads = torch.autograd.grad((out.float() * probe).sum(), (x, f))
            results.append((out.float(), *(grad.float() for grad in grads)))
        for index, (want, got) in enumerate(zip(*results)):
            want = want.view_as(got)
            if dtype == torch.float32 and index < 2:  # the output and the input's gradient
                assert torch.equal(got, want)
            elif dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, rtol=2e-2, atol=4e-2)


def test_on_a_gpu_every_attention_layer_takes_the_fused_rotation(monkeypatch):
    """Routing, with the GPU check and the compiled function stood in: both towers' packed
    forward, the trainable vision tower's learned angles included, rotate every query and key
    through it, and (its fp32 arithmetic being megatron's) give the same gradients."""
    from megatron.core.transformer import attention

    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local", rope_fusion=True).train()
    inputs = two_packed_samples(cfg, seed=1)
    calls = []

    def counted_rotate(t, freqs, mscale):
        calls.append(freqs.requires_grad)
        return rotate(t, freqs, mscale)

    gradients = []
    for on_gpu in (False, True):
        monkeypatch.setattr(packed_rope, "_on_gpu", lambda t: on_gpu)
        monkeypatch.setattr(packed_rope, "fused_rotation", lambda: counted_rotate)
        gradients.append(parameter_gradients(model, inputs))
    layers = cfg.language.num_layers + cfg.vision.num_layers
    assert len(calls) == 2 * layers  # query and key of every layer, only on the "GPU"
    assert calls.count(True) == 2 * cfg.vision.num_layers  # the learned angles: with gradient
    # --no-rope-fusion (rope_fusion=False): megatron's rotation on the GPU too
    unfused = build_model(cfg, attention_backend="local", rope_fusion=False)
    unfused(*inputs[0], **inputs[1])
    assert len(calls) == 2 * layers
    assert attention.apply_rotary_pos_emb.__wrapped__ is rope_utils.apply_rotary_pos_emb
    cpu, gpu = gradients
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6, msg=name)

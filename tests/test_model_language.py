"""The language model equals transformers' Qwen3 (same weights) to fp32 tolerance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_patch.model import build_model, get_config
from megatron_patch.model.hf_mapping import hf_to_mcore, mcore_to_hf
from megatron_patch.model.sharding import load_full_state_dict
from test_model_reference import hf_qwen3, init_parallel


def _models(seed=0, **overrides):
    init_parallel(1, 1)
    cfg = get_config("tiny", overrides)
    torch.manual_seed(seed)
    hf = hf_qwen3(cfg)
    model = build_model(cfg, attention_backend="local").eval()
    full = {n: p for n, p in model.named_parameters() if not n.startswith("language_model.")}
    full.update(hf_to_mcore(hf.state_dict(), cfg))
    load_full_state_dict(model, full)
    return cfg, hf, model


def test_logits_match_transformers_qwen3():
    cfg, hf, model = _models(rope_theta=5_000_000.0)
    ids = torch.randint(16, cfg.language.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(33).expand(2, -1)
    with torch.no_grad():
        ours = model(ids, pos)
        ref = hf(input_ids=ids).logits
    assert ours.shape == ref.shape == (2, 33, cfg.language.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # per-token loss (megatron convention) == HF cross entropy
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        loss = model(ids, pos, labels=labels)
    ref_loss = F.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, ref_loss.view(2, 33), rtol=1e-4, atol=1e-4)


def test_rope_base_matters():
    """The RoPE base really flows from the config: a wrong base changes the logits."""
    cfg, hf, model = _models(rope_theta=5_000_000.0)
    ids = torch.randint(16, cfg.language.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(64)[None]
    with torch.no_grad():
        a = model(ids, pos)
        model.language_model.rotary_pos_emb.inv_freq = 1.0 / (
            1e4 ** (torch.arange(0, cfg.language.head_dim, 2).float() / cfg.language.head_dim))
        b = model(ids, pos)
    assert (a - b).abs().max() > 1e-3


def test_packed_sequences_equal_separate_samples():
    """thd packing with position_ids reset per sample == each sample run alone (block-diagonal
    causal attention, RoPE restarting at every sample)."""
    cfg, hf, model = _models()
    g = torch.Generator().manual_seed(3)
    lens = [7, 12, 5]
    seqs = [torch.randint(16, cfg.language.vocab_size, (n,), generator=g) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=12, max_seqlen_kv=12)
    with torch.no_grad():
        packed = model(ids, pos, packed_seq_params=psp)[0]
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = hf(input_ids=s[None]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-4)


def test_hf_mapping_round_trip_is_exact():
    cfg, hf, model = _models()
    sd = hf.state_dict()
    back = mcore_to_hf(hf_to_mcore(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # newer transformers prefixes map to the same tensors
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in sd.items()}
    a, b = hf_to_mcore(sd, cfg), hf_to_mcore(renamed, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def eager_fusions():
    """megatron wraps its fusions in torch.compile; on CPU that is an inductor C++ build (15 s and
    6 s cold for the two tests below), not the Triton kernels a GPU gets, so they run eagerly
    here: what is checked is megatron's fused autograd functions, not the compiler."""
    return torch.compiler.set_stance("force_eager")  # restores the stance on exit


def test_fused_swiglu_matches_the_unfused_model():
    """fused_kernels (the GPU default) switches the language model to megatron's fused SwiGLU:
    loss and every gradient equal the unfused model's to float rounding. The vision tower keeps
    its GELU (megatron's fused bias-GELU would be the tanh approximation) and takes megatron's
    fused bias-dropout-add."""
    from test_model_reference import image_batch
    init_parallel(1, 1)
    cfg = get_config("tiny")
    ids, pixels, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 2)], 32, [0, 1])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    labels = torch.roll(ids, -1, 1)
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, fused_kernels=fused)
        assert model.language_model.config.bias_activation_fusion is fused
        assert model.vision_model.config.bias_activation_fusion is False
        assert model.vision_model.config.bias_dropout_fusion is fused  # its biases + residual
        with eager_fusions():
            loss = model(ids, positions, pixel_values=pixels, image_grid_thw=grid, labels=labels)
            loss.sum().backward()
        results[fused] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results[False], results[True]
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_cross_entropy_equals_the_unfused_one_for_bf16_logits():
    """Why --cross-entropy-loss-fusion defaults to on with --bf16 (on CUDA): megatron's fused
    kernel returns the logits' gradient in bf16 whatever the logits' dtype (its source:
    ``grad_input.to(torch.bfloat16)``), which for bf16 logits is exactly the unfused result."""
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    init_parallel(1, 1)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 2, 512, generator=generator) * 3).to(torch.bfloat16)
    target = torch.randint(0, 512, (16, 2), generator=generator)
    weights = torch.rand(16, 2, generator=generator)
    unfused, fused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    unfused_loss = vocab_parallel_cross_entropy(unfused, target)
    with eager_fusions():
        fused_loss = fused_vocab_parallel_cross_entropy(
            fused, target, parallel_state.get_tensor_model_parallel_group())
        (fused_loss * weights).sum().backward()
    (unfused_loss * weights).sum().backward()
    assert torch.allclose(fused_loss, unfused_loss, rtol=1e-6, atol=1e-6)
    assert fused.grad.dtype == torch.bfloat16 and torch.equal(fused.grad, unfused.grad)


def test_cross_entropy_fusion_defaults_to_bf16_on_cuda(monkeypatch):
    from argparse import Namespace

    from megatron_patch.training.kernels import fused_cross_entropy
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        for bf16 in (False, True):
            default, off = (Namespace(cross_entropy_loss_fusion=fusion, bf16=bf16,
                                      loss_chunk_tokens=0) for fusion in (None, False))
            assert fused_cross_entropy(default) == (cuda and bf16)
            assert fused_cross_entropy(off) is False

"""Vision tower + adapter equal an independent plain-PyTorch RICE-ViT; the full model equals
reference vision + transformers Qwen3; mixed image/text-only batches run forward and backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_patch.model import build_model, get_config
from megatron_patch.model.hf_mapping import hf_to_mcore
from megatron_patch.model.sharding import load_full_state_dict
from test_model_reference import RefRiceVisual, hf_qwen3, image_batch, init_parallel

GRIDS = [(1, 4, 4), (1, 2, 6), (1, 6, 2)]  # three images of different sizes and aspect ratios


def _models(seed=0):
    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(seed)
    ref_visual, hf_lm = RefRiceVisual(cfg).eval(), hf_qwen3(cfg)
    model = build_model(cfg, attention_backend="local").eval()
    hf_sd = {**{"visual." + k: v for k, v in ref_visual.state_dict().items()}, **hf_lm.state_dict()}
    load_full_state_dict(model, hf_to_mcore(hf_sd, cfg))
    return cfg, ref_visual, hf_lm, model


def test_vision_tower_and_adapter_match_reference():
    cfg, ref, _, model = _models()
    _, pix, grid = image_batch(cfg, GRIDS, 64, [0, 0, 0])
    with torch.no_grad():
        ours_enc = model.vision_model(pix, grid)
        ours = model.image_features(pix, grid)
        ref_enc, ref_out = ref.encode(pix, grid), ref(pix, grid)
    assert ours_enc.shape == (sum(t * h * w for t, h, w in GRIDS), cfg.vision.hidden_size)
    torch.testing.assert_close(ours_enc, ref_enc, rtol=1e-4, atol=1e-4)
    assert ours.shape == (ours_enc.shape[0] // 4, cfg.language.hidden_size)
    torch.testing.assert_close(ours, ref_out, rtol=1e-4, atol=1e-4)
    # an image alone gives the same features; the same patches read as a 6x2 grid (2D RoPE) do not
    with torch.no_grad():
        first_alone = model.vision_model(pix[:16], torch.tensor([[1, 4, 4]]))
        transposed = model.vision_model(pix[16:28], torch.tensor([[1, 6, 2]]))
    torch.testing.assert_close(first_alone, ref_enc[:16], rtol=1e-4, atol=1e-4)
    assert (transposed - ref_enc[16:28]).abs().max() > 1e-3


def test_full_model_logits_match_reference_vision_plus_hf_qwen3():
    cfg, ref, hf_lm, model = _models()
    ids, pix, grid = image_batch(cfg, GRIDS, 40, [0, 0, 1])  # row 0: two images, row 1: one
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        ours = model(ids, pos, pixel_values=pix, image_grid_thw=grid)
        emb = hf_lm.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == cfg.image_token_id)[..., None].expand_as(emb), ref(pix, grid))
        want = hf_lm(inputs_embeds=emb).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_mixed_batch_multi_image_and_text_only_forward_backward():
    """Row 0: two images of different sizes; row 1: text only; row 2: one image. Loss and grads
    are finite, vision params get gradients, and the text-only row equals running it alone."""
    cfg, _, hf_lm, model = _models()
    model.train()
    ids, pix, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 6), (1, 6, 2)], 36, [0, 0, 2])
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = (ids != cfg.image_token_id).float()
    loss = model(ids, pos, pixel_values=pix, image_grid_thw=grid, labels=labels)
    assert loss.shape == ids.shape
    total = (loss * loss_mask).sum() / loss_mask.sum()
    total.backward()
    assert torch.isfinite(total)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("vision_model.patch_embed.proj.weight", "vision_model.class_embedding",
                 "vision_model.class_pos_emb", "vision_model.decoder.layers.0.self_attention.linear_qkv.weight",
                 "adapter.linear_fc1.weight", "language_model.embedding.word_embeddings.weight"):
        assert grads[name].abs().sum() > 0, name
    with torch.no_grad():
        alone = model(ids[1:2], pos[1:2], labels=labels[1:2])
        ref_row = F.cross_entropy(hf_lm(input_ids=ids[1:2]).logits[0], labels[1], reduction="none")
    torch.testing.assert_close(loss[1:2].detach(), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], ref_row, rtol=1e-4, atol=1e-4)


def test_text_only_batch_and_token_count_check():
    """A text-only batch gives every trainable vision and adapter parameter a zero gradient
    (megatron's overlapped grad reduce waits for all of a bucket's), and changes nothing else:
    with the tower frozen (nothing run for it) the loss and language gradients are the same."""
    cfg, _, _, model = _models()
    ids = torch.randint(16, cfg.language.vocab_size, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    loss = model(ids, pos, labels=ids)
    loss.mean().backward()
    vision = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision_model.", "adapter."))]
    assert vision and all(p.grad is not None and not p.grad.any() for _, p in vision)
    language = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("language_model.")}
    model.zero_grad(set_to_none=True)
    for _, parameter in vision:
        parameter.requires_grad_(False)
    frozen = model(ids, pos, labels=ids)
    frozen.mean().backward()
    assert torch.equal(frozen, loss) and all(p.grad is None for _, p in vision)
    assert all(torch.equal(p.grad, language[n]) for n, p in model.named_parameters() if n in language)
    bad, pix, grid = image_batch(cfg, [(1, 4, 4)], 16, [0])
    bad[0, 2] = 100  # one image slot fewer than features
    try:
        model(bad, pos[:1], pixel_values=pix, image_grid_thw=grid)
    except ValueError as exc:
        assert "image_pad" in str(exc)
    else:
        raise AssertionError("mismatched image tokens must raise")


def test_bf16_params_close_to_fp32():
    """params_dtype=bf16 casts every tower (incl. the plain-torch patch embed/norms/class token)
    and stays within bf16 tolerance of the fp32 model; 2D RoPE angles are computed in fp32."""
    from megatron_patch.model.sharding import full_state_dict

    cfg, _, _, model = _models()
    m16 = build_model(cfg, attention_backend="local", params_dtype=torch.bfloat16).eval()
    load_full_state_dict(m16, full_state_dict(model))
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    ids, pix, grid = image_batch(cfg, GRIDS, 40, [0, 0, 1])
    pos = torch.arange(40).expand(2, -1)
    with torch.no_grad():
        a = model(ids, pos, pixel_values=pix, image_grid_thw=grid)
        b = m16(ids, pos, pixel_values=pix, image_grid_thw=grid).float()
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.02)

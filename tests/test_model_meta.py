"""Full-size configs build on the meta device with the published parameter counts; config
presets/overrides; layer-spec backend choice."""
from __future__ import annotations

import logging

import pytest
import torch

from megatron_patch.model import build_model, count_parameters, get_config, make_model_provider
from megatron_patch.model import layer_specs
from test_model_reference import init_parallel


def _expected(cfg):
    """Parameter counts from the architecture, written out independently of the modules."""
    v, l = cfg.vision, cfg.language
    D, F = v.hidden_size, v.ffn_hidden_size
    vision = (3 * v.patch_size ** 2 * D + D + v.head_dim // 2 + 2 * D
              + v.num_layers * (2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D
                                + (D * F + F) + (F * D + D)))
    M = 4 * D
    adapter = 2 * D + (M * M + M) + (M * l.hidden_size + l.hidden_size)
    h, d, q, g = l.hidden_size, l.head_dim, l.num_attention_heads, l.num_query_groups
    layer = (h + h * (q + 2 * g) * d + 2 * d + q * d * h + h + 3 * h * l.ffn_hidden_size)
    language = 2 * l.vocab_size * h + l.num_layers * layer + h
    return vision, adapter, language


@pytest.mark.parametrize("name, vision_b, language_b", [
    ("llava-ov-1.5-4b", 0.30, 4.41),   # model card: ViT ~0.3B, Qwen3-4B LLM + untied head ~4.4B
    ("llava-ov-1.5-8b", 0.30, 8.19),
])
def test_full_size_builds_on_meta_with_right_counts(name, vision_b, language_b):
    init_parallel(1, 1)
    cfg = get_config(name)
    with torch.device("meta"):
        model = build_model(cfg, attention_backend="local", use_cpu_initialization=True,
                            perform_initialization=False)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # no memory used
    counts = count_parameters(model)
    vision, adapter, language = _expected(cfg)
    assert (counts["vision"], counts["adapter"], counts["language"]) == (vision, adapter, language)
    assert counts["vision"] / 1e9 == pytest.approx(vision_b, abs=0.01)
    assert counts["language"] / 1e9 == pytest.approx(language_b, abs=0.01)
    lm = model.language_model
    assert len(lm.decoder.layers) == 36 and len(model.vision_model.decoder.layers) == 24
    assert lm.rotary_pos_emb.inv_freq[1].item() == pytest.approx(cfg.language.rope_theta ** (-2 / 128))


def test_public_config_values():
    c4, c8 = get_config("llava-ov-1.5-4b"), get_config("llava-ov-1.5-8b")
    assert (c4.language.hidden_size, c4.language.num_layers, c4.language.num_attention_heads,
            c4.language.num_query_groups, c4.language.head_dim, c4.language.ffn_hidden_size,
            c4.language.vocab_size) == (2560, 36, 32, 8, 128, 9728, 151936)
    assert c4.language.rope_theta == 5e6 and c8.language.rope_theta == 1e6
    assert (c8.language.hidden_size, c8.language.ffn_hidden_size) == (4096, 12288)
    for c in (c4, c8):
        assert (c.vision.num_layers, c.vision.hidden_size, c.vision.num_attention_heads,
                c.vision.ffn_hidden_size, c.vision.patch_size, c.vision.spatial_merge_size) == \
            (24, 1024, 16, 4096, 14, 2)
        assert (c.image_token_id, c.video_token_id) == (151655, 151656)


def test_overrides():
    cfg = get_config("tiny", {"num_layers": 6, "hidden_size": 96, "vision_num_layers": 3,
                              "language.rope_theta": 1e4, "image_token_id": 7,
                              "num_attention_heads": None})
    assert (cfg.language.num_layers, cfg.language.hidden_size, cfg.vision.num_layers) == (6, 96, 3)
    assert cfg.language.rope_theta == 1e4 and cfg.image_token_id == 7
    assert cfg.language.num_attention_heads == 4  # None = keep preset
    with pytest.raises(ValueError):
        get_config("tiny", {"no_such_field": 1})
    with pytest.raises(ValueError):
        get_config("nope")
    with pytest.raises(ValueError):
        get_config("tiny", {"num_query_groups": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_backend_falls_back_to_local_once_and_te_can_be_forced(caplog):
    """On a CPU the reason is the machine, whatever the dtype, and only an info line."""
    layer_specs._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger=layer_specs.__name__):
        assert layer_specs.resolve_backend("auto", torch.bfloat16) == "local"
        assert layer_specs.resolve_backend("auto", torch.bfloat16) == "local"
        assert layer_specs.resolve_backend("auto", torch.float32) == "local"
    lines = [r for r in caplog.records if "using local megatron-core modules" in r.getMessage()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0].getMessage()
    assert lines[0].levelno == logging.INFO
    assert layer_specs.resolve_backend("local") == "local"
    with pytest.raises(RuntimeError, match="te requested but CUDA is not available"):
        layer_specs.resolve_backend("te", torch.bfloat16)
    with pytest.raises(ValueError):
        layer_specs.resolve_backend("flash")


def test_fp32_weights_never_get_the_te_spec(caplog, monkeypatch):
    """TE's fp32 attention refuses packed input (the vision tower's), even where TE runs (a GPU
    with TE installed, stood in for here); on a machine without it, that is the reason given."""
    layer_specs._LOGGED.clear()
    monkeypatch.setattr(layer_specs, "te_available", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger=layer_specs.__name__):
        assert layer_specs.resolve_backend("auto", torch.float32) == "local"
    assert "no torch.float32 attention for packed (thd)" in caplog.text
    with pytest.raises(RuntimeError, match="train with --bf16"):
        layer_specs.resolve_backend("te", torch.float32)
    assert layer_specs.te_dtype_problem(torch.bfloat16) is None
    assert layer_specs.resolve_backend("auto", torch.bfloat16) == "te"



def test_model_provider_builds_the_requested_stage():
    init_parallel(1, 1)
    provider = make_model_provider(get_config("tiny"), attention_backend="local")
    middle = provider(pre_process=False, post_process=False)
    assert middle.vision_model is None and middle.adapter is None
    assert not hasattr(middle.language_model, "embedding") and not hasattr(middle.language_model, "output_layer")
    first = provider(pre_process=True, post_process=False)
    assert first.vision_model is not None and hasattr(first.language_model, "embedding")
    assert set(count_parameters(first)) == {"vision", "adapter", "language", "total"}


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_method_std_sets_the_random_init_of_both_towers(std):
    """--init-method-std reaches megatron's init of the language and vision weight matrices
    (the tiny model trains from scratch; its init scale decides how fast it learns)."""
    init_parallel(1, 1)
    torch.manual_seed(0)
    model = build_model(get_config("tiny", {"init_method_std": std}), attention_backend="local",
                        use_cpu_initialization=True)
    weights = dict(model.named_parameters())
    for name in ("language_model.decoder.layers.0.self_attention.linear_qkv.weight",
                 "language_model.decoder.layers.0.mlp.linear_fc1.weight",
                 "language_model.embedding.word_embeddings.weight",
                 "vision_model.decoder.layers.0.self_attention.linear_qkv.weight"):
        assert weights[name].std().item() == pytest.approx(std, rel=0.1), name

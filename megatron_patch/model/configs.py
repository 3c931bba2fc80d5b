"""Model configurations by name (``tiny``, ``llava-ov-1.5-4b``, ``llava-ov-1.5-8b``) plus overrides.

The numbers for the public models come from the public LLaVA-OneVision-1.5 repository
(``ds/llavaonevision1_5/configuration_llavaonevision1_5.py`` and
``tools/convert_checkpoint/config/llava-ov-1.5-{4b,8b}/``):

* vision (RICE-ViT, both sizes): depth 24, hidden 1024, 16 heads, MLP 4096 (GELU), patch 14,
  spatial merge 2, LayerNorm eps 1e-5, 2D RoPE theta 1e4.
* 4B language (Qwen3-4B): 36 layers, hidden 2560, 32 heads, 8 KV heads, head_dim 128, MLP 9728,
  vocab 151936, RMSNorm eps 1e-6. RoPE base 5e6, checked against three sources in that repo:
  the HF text config class (``rope_theta=5000000.0`` default, written for the 4B) and the
  Megatron port's ``llava-ov-1.5-4b`` config (``rotary_base=5000000``) agree on 5e6; only the
  converter's json copies the Qwen3-4B base model's 1e6. The released checkpoint's config.json
  could not be read offline, so the converter (later issue) must pass the checkpoint's own
  ``rope_theta`` as an override. Untied output layer (the Qwen3-4B base ties them; LLaVA-OV-1.5
  adds a separate ``lm_head``, which is why the language model is ~4.4B, not 4.0B).
* 8B language (Qwen3-8B): 36 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 12288,
  rope_theta 1e6 (Megatron port config and converter json agree).
* image token ``<|image_pad|>`` = 151655, video 151656. Output layer untied from the embedding.

``tiny`` is sized to train on 2 CPU cores in minutes and still exercise GQA, q/k norm, SwiGLU,
multi-head 2D RoPE, the 2x2 merge and TP=2 / PP=2 splits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional


@dataclass
class VisionConfig:
    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    patch_size: int = 14
    in_channels: int = 3
    temporal_patch_size: int = 1
    spatial_merge_size: int = 2
    layernorm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch (C * T * P * P), as the data encoder writes it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class LanguageConfig:
    num_layers: int = 36
    hidden_size: int = 2560
    ffn_hidden_size: int = 9728
    num_attention_heads: int = 32
    num_query_groups: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    untie_embeddings_and_output_weights: bool = True


@dataclass
class LlavaOVConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    # Pipeline layout of the language decoder (vision + adapter always live on the first stage).
    # None = megatron's even split; set to give the first stage fewer LLM layers, since it also
    # runs the vision tower, and/or the last stage fewer since it computes the logits/loss.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    # std of the normal init of every weight matrix (Megatron-LM's --init-method-std). Only
    # matters for weights trained from scratch: converted checkpoints overwrite it.
    init_method_std: float = 0.02

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _tiny() -> LlavaOVConfig:
    return LlavaOVConfig(
        name="tiny",
        vision=VisionConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128),
        language=LanguageConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                                num_attention_heads=4, num_query_groups=2, head_dim=16,
                                vocab_size=512, rope_theta=1_000_000.0,
                                max_position_embeddings=8192),
        # ids of <|image_pad|>/<|video_pad|> in the project's tiny tokenizer (special tokens come
        # first, megatron_patch.data.tokenizer.SPECIAL_TOKENS); trainers should still pass the
        # tokenizer's own id as the image_token_id override.
        image_token_id=5,
        video_token_id=6,
        # the real presets' 0.02 is ~1/sqrt(hidden) at width 2560 (Qwen's initializer_range); at
        # width 64 the same rule gives 0.125. With 0.02 the demo's colour and shape read-outs
        # stayed near chance for thousands of steps (docs/BENCHMARKS.md, session 13).
        init_method_std=0.125,
    )


def _ov_4b() -> LlavaOVConfig:
    return LlavaOVConfig(name="llava-ov-1.5-4b")


def _ov_8b() -> LlavaOVConfig:
    return LlavaOVConfig(
        name="llava-ov-1.5-8b",
        language=LanguageConfig(num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                                num_attention_heads=32, num_query_groups=8, head_dim=128,
                                rope_theta=1_000_000.0, max_position_embeddings=40960),
    )


PRESETS = {"tiny": _tiny, "llava-ov-1.5-4b": _ov_4b, "llava-ov-1.5-8b": _ov_8b}

# Megatron-LM style argument names accepted as overrides -> (section, field).
_ALIASES = {
    "num_layers": ("language", "num_layers"),
    "hidden_size": ("language", "hidden_size"),
    "ffn_hidden_size": ("language", "ffn_hidden_size"),
    "num_attention_heads": ("language", "num_attention_heads"),
    "num_query_groups": ("language", "num_query_groups"),
    "kv_channels": ("language", "head_dim"),
    "vocab_size": ("language", "vocab_size"),
    "rotary_base": ("language", "rope_theta"),
    "rope_theta": ("language", "rope_theta"),
    "norm_epsilon": ("language", "rms_norm_eps"),
    "max_position_embeddings": ("language", "max_position_embeddings"),
    "vision_num_layers": ("vision", "num_layers"),
    "vision_hidden_size": ("vision", "hidden_size"),
    "vision_num_attention_heads": ("vision", "num_attention_heads"),
    "vision_ffn_hidden_size": ("vision", "ffn_hidden_size"),
    "decoder_first_pipeline_num_layers": (None, "num_layers_in_first_pipeline_stage"),
    "decoder_last_pipeline_num_layers": (None, "num_layers_in_last_pipeline_stage"),
}


def get_config(name: str, overrides: Optional[Mapping[str, Any]] = None) -> LlavaOVConfig:
    """Preset by name, then overrides. Keys are Megatron-LM argument names (``num_layers``,
    ``hidden_size``, ``vision_num_layers`` ...), dotted paths (``language.rope_theta``) or
    top-level fields (``image_token_id``). ``None`` values are ignored so argparse namespaces
    can be passed through as ``vars(args)``-style dicts."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in _ALIASES:
            section, attr = _ALIASES[key]
        elif "." in key:
            section, attr = key.split(".", 1)
        else:
            section, attr = None, key
        target = cfg if section is None else getattr(cfg, section)
        if not hasattr(target, attr):
            raise ValueError(f"unknown model config field {key!r}")
        setattr(target, attr, type(getattr(target, attr))(value)
                if getattr(target, attr) is not None else value)
    validate(cfg)
    return cfg


def validate(cfg: LlavaOVConfig) -> None:
    lm, vi = cfg.language, cfg.vision
    if lm.num_attention_heads % lm.num_query_groups:
        raise ValueError("language num_attention_heads must be a multiple of num_query_groups")
    if vi.hidden_size % vi.num_attention_heads:
        raise ValueError("vision hidden_size must be a multiple of its heads")
    if vi.head_dim % 4:
        raise ValueError("vision head_dim must be divisible by 4 (2D RoPE splits it over h and w)")
    if not 0 <= cfg.image_token_id < lm.vocab_size:
        raise ValueError(f"image_token_id {cfg.image_token_id} outside vocab {lm.vocab_size}")

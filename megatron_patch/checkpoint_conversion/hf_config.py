"""config.json of a LLaVA-OneVision-1.5 HF checkpoint <-> our :class:`LlavaOVConfig`.

The field names are the published ones (``Llavaonevision1_5Config`` with a ``vision_config``
(``RiceConfig``, model_type ``rice_vit``) and a ``text_config`` (Qwen3-style) section, see
``ds/llavaonevision1_5/configuration_llavaonevision1_5.py`` in the public repository). A field
missing from config.json takes that class's default, which is the 4B value -- the same default
our dataclasses carry, so an absent field reads as it would in transformers.

The trainer builds its model from ``--model`` alone, so a checkpoint whose config.json differs in
any field that shapes the weights or the maths must be refused *by name* before converting,
not discovered as a shape error (or worse, silently different RoPE) later.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from megatron_patch.checkpoint_conversion.errors import ConversionError, raise_if_problems
from megatron_patch.model.configs import (PRESETS, LanguageConfig, LlavaOVConfig, VisionConfig,
                                          get_config)

# our field (section.attr) <- config.json path; these decide weight shapes or the forward maths
FIELDS: Tuple[Tuple[str, str], ...] = (
    ("vision.num_layers", "vision_config.depth"),
    ("vision.hidden_size", "vision_config.hidden_size"),
    ("vision.num_attention_heads", "vision_config.num_heads"),
    ("vision.ffn_hidden_size", "vision_config.intermediate_size"),
    ("vision.patch_size", "vision_config.patch_size"),
    ("vision.in_channels", "vision_config.in_channels"),
    ("vision.temporal_patch_size", "vision_config.temporal_patch_size"),
    ("vision.spatial_merge_size", "vision_config.spatial_merge_size"),
    ("vision.layernorm_eps", "vision_config.layer_norm_eps"),
    ("language.num_layers", "text_config.num_hidden_layers"),
    ("language.hidden_size", "text_config.hidden_size"),
    ("language.ffn_hidden_size", "text_config.intermediate_size"),
    ("language.num_attention_heads", "text_config.num_attention_heads"),
    ("language.num_query_groups", "text_config.num_key_value_heads"),
    ("language.head_dim", "text_config.head_dim"),
    ("language.vocab_size", "text_config.vocab_size"),
    ("language.rope_theta", "text_config.rope_theta"),
    ("language.rms_norm_eps", "text_config.rms_norm_eps"),
)
# informational: they change neither weights nor the trainer's forward (ids come from the tokenizer)
SOFT_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("language.max_position_embeddings", "text_config.max_position_embeddings"),
    ("image_token_id", "image_token_id"),
    ("video_token_id", "video_token_id"),
)
_DEFAULTS = {"vision": VisionConfig(), "language": LanguageConfig(), None: LlavaOVConfig()}


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json: give the directory of a HF checkpoint "
                              "(config.json, *.safetensors, tokenizer files)")
    with open(path) as handle:
        return json.load(handle)


def _split(field: str) -> Tuple[Optional[str], str]:
    return tuple(field.split(".", 1)) if "." in field else (None, field)  # type: ignore[return-value]


def _hf_value(hf: Dict[str, Any], path: str, field: str) -> Any:
    node: Any = hf
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.get(key) or {}
    if leaf == "rope_theta" and leaf not in node:  # transformers 5 keeps it in rope_parameters
        node = node.get("rope_parameters") or {}
    if leaf in node and node[leaf] is not None:
        return node[leaf]
    section, attr = _split(field)
    return getattr(_DEFAULTS[section], attr)


def _get(cfg: LlavaOVConfig, field: str) -> Any:
    section, attr = _split(field)
    return getattr(cfg if section is None else getattr(cfg, section), attr)


def unsupported_features(hf: Dict[str, Any]) -> List[str]:
    """Architecture switches our model does not implement, each as a readable line."""
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    problems = []
    checks = (
        ("text_config.hidden_act", text.get("hidden_act", "silu"), "silu"),
        ("vision_config.hidden_act", vision.get("hidden_act", "gelu"), "gelu"),
        ("text_config.attention_bias", bool(text.get("attention_bias", False)), False),
        ("text_config.use_sliding_window", bool(text.get("use_sliding_window", False)), False),
    )
    for name, found, wanted in checks:
        if found != wanted:
            problems.append(f"{name} = {found!r} (this model supports {wanted!r})")
    scaling = text.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default", "mrope"):
        problems.append(f"text_config.rope_scaling = {scaling!r} (only plain RoPE is supported)")
    hidden = vision.get("hidden_size", VisionConfig().hidden_size)
    if vision.get("embed_dim", hidden) != hidden:
        problems.append(f"vision_config.embed_dim = {vision['embed_dim']} != hidden_size {hidden}")
    text_hidden = text.get("hidden_size", LanguageConfig().hidden_size)
    if vision.get("text_hidden_size", text_hidden) != text_hidden:
        problems.append(f"vision_config.text_hidden_size = {vision['text_hidden_size']} != "
                        f"text_config.hidden_size {text_hidden}")
    return problems


def differences(hf: Dict[str, Any], cfg: LlavaOVConfig, fields=FIELDS) -> List[str]:
    lines = []
    for field, path in fields:
        ours, theirs = _get(cfg, field), _hf_value(hf, path, field)
        if float(ours) != float(theirs):
            lines.append(f"{field}: --model {cfg.name} has {ours!r}, config.json {path} is {theirs!r}")
    return lines


def infer_model_name(hf: Dict[str, Any]) -> Optional[str]:
    """The preset whose architecture matches config.json (None when none does)."""
    for name in PRESETS:
        if not differences(hf, get_config(name)):
            return name
    return None


def check_config(hf: Dict[str, Any], model: Union[str, LlavaOVConfig, None]
                 ) -> Tuple[LlavaOVConfig, List[str]]:
    """The model config to convert with, and notes about informational fields.

    ``model``: a preset name, a config object (API use: presets with overrides), or None for the
    preset matching config.json. Raises ConversionError naming every unsupported switch and every
    field where config.json and the model disagree."""
    raise_if_problems("config.json describes a model this converter cannot represent",
                      [("unsupported settings", unsupported_features(hf))])
    if model is None:
        model = infer_model_name(hf)
        if model is None:
            closest = min(PRESETS, key=lambda name: len(differences(hf, get_config(name))))
            raise_if_problems(
                f"config.json matches no model preset ({', '.join(PRESETS)}); closest is "
                f"{closest!r}. Pass --model to compare with a specific one",
                [(f"differences from {closest}", differences(hf, get_config(closest)))])
    cfg = model if isinstance(model, LlavaOVConfig) else get_config(model)
    raise_if_problems(f"config.json does not match --model {cfg.name}: the trainer builds its model "
                      "from --model alone and would compute something else with these weights. Pick "
                      "the matching --model, or correct the preset (megatron_patch/model/configs.py)",
                      [("mismatched fields", differences(hf, cfg))])
    notes = [line + " (informational: weights and the trainer are unaffected)"
             for line in differences(hf, cfg, SOFT_FIELDS)]
    return cfg, notes


def config_from_dict(data: Dict[str, Any]) -> LlavaOVConfig:
    """Inverse of ``LlavaOVConfig.to_dict`` (as stored in run_config.json and our records)."""
    data = dict(data)
    vision, language = VisionConfig(**data.pop("vision")), LanguageConfig(**data.pop("language"))
    known = {f.name for f in dataclasses.fields(LlavaOVConfig)}
    return LlavaOVConfig(vision=vision, language=language, **{k: v for k, v in data.items() if k in known})


def hf_config_for(cfg: LlavaOVConfig, dtype: str, template: Optional[Dict[str, Any]] = None,
                  special_ids: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """config.json for ``cfg``: the ``template`` (the source checkpoint's own config.json) with
    every architecture field set from ``cfg`` (the informational SOFT_FIELDS keep the source's
    values: the presets cannot know them for every release), or a complete one with the
    published names."""
    hf = json.loads(json.dumps(template)) if template else _fresh_config(cfg)
    for field, path in FIELDS + SOFT_FIELDS:
        *parents, leaf = path.split(".")
        node = hf
        for key in parents:
            node = node.setdefault(key, {})
        if leaf == "rope_theta" and "rope_parameters" in node and leaf not in node:
            node = node["rope_parameters"]
        if (field, path) in SOFT_FIELDS and leaf in node:
            continue
        node[leaf] = _get(cfg, field)
    hf["text_config"]["tie_word_embeddings"] = False
    hf["vision_config"]["embed_dim"] = cfg.vision.hidden_size
    hf["vision_config"]["text_hidden_size"] = cfg.language.hidden_size
    hf["vocab_size"] = cfg.language.vocab_size
    hf["torch_dtype"] = dtype
    if "dtype" in hf:  # transformers 5 spelling
        hf["dtype"] = dtype
    if special_ids and not template:
        hf["vision_start_token_id"] = special_ids.get("<|vision_start|>")
        hf["vision_end_token_id"] = special_ids.get("<|vision_end|>")
    return hf


def _fresh_config(cfg: LlavaOVConfig) -> Dict[str, Any]:
    init_std = cfg.init_method_std
    return {
        "architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"],
        "model_type": "llavaonevision1_5",
        "tie_word_embeddings": False,
        "vision_config": {"model_type": "rice_vit", "hidden_act": "gelu", "initializer_range": init_std},
        "text_config": {"model_type": "LLaVAOneVision1_5_text", "hidden_act": "silu",
                        "attention_bias": False, "attention_dropout": 0.0, "rope_scaling": None,
                        "use_sliding_window": False, "sliding_window": None,
                        "max_window_layers": cfg.language.num_layers, "initializer_range": init_std,
                        "use_cache": True},
    }

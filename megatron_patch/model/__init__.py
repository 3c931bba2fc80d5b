"""LLaVA-OneVision-1.5 on megatron-core (RICE-ViT + merger adapter + Qwen3).

Public API for the trainer and the converter:

* :func:`get_config` (``tiny``, ``llava-ov-1.5-4b``, ``llava-ov-1.5-8b`` + overrides)
* :func:`build_model` / :func:`make_model_provider` (after ``initialize_model_parallel``)
* :class:`LlavaOVModel` forward contract: see :mod:`megatron_patch.model.llava_ov`
* HF <-> mcore names: :mod:`megatron_patch.model.hf_mapping`
"""
from megatron_patch.model.configs import LlavaOVConfig, get_config, PRESETS
from megatron_patch.model.builder import build_model, make_model_provider, count_parameters
from megatron_patch.model.llava_ov import LlavaOVModel

__all__ = ["LlavaOVConfig", "get_config", "PRESETS", "build_model", "make_model_provider",
           "count_parameters", "LlavaOVModel"]

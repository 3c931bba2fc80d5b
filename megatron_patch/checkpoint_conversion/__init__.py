"""HF (safetensors) <-> megatron dist-checkpoint conversion for LLaVA-OneVision-1.5.

* :func:`convert_hf_to_mcore` (``tools/convert_hf_to_mcore.py``): HF directory -> base checkpoint
  ``OUT/iter_0000000`` the trainer ``--load``s at any TP/PP, tokenizer files beside it.
* :func:`convert_mcore_to_hf` (``tools/convert_mcore_to_hf.py``): any base or run checkpoint, saved
  at any TP/PP -> sharded safetensors + index, config.json, tokenizer files.

Modules, one concern each: ``hf_config`` (config.json <-> model config, mismatches named),
``hf_files`` (safetensors headers, lazy reads, sharded writing, side files), ``hf_stream``
(HF tensors -> megatron tensors, streamed and checked against the table in
``megatron_patch.model.hf_mapping``), ``mcore_reader`` (layer-at-a-time reads from a
dist-checkpoint), ``runtime`` (single-process megatron setup; why TP=1 suffices),
``parallel_check`` (is TP/PP possible), ``record`` (what the export should look like),
``to_mcore`` / ``to_hf`` (the two directions), ``cli``.
"""
from megatron_patch.checkpoint_conversion.errors import ConversionError


def convert_hf_to_mcore(*args, **kwargs):
    from megatron_patch.checkpoint_conversion.to_mcore import convert_hf_to_mcore as convert
    return convert(*args, **kwargs)


def convert_mcore_to_hf(*args, **kwargs):
    from megatron_patch.checkpoint_conversion.to_hf import convert_mcore_to_hf as convert
    return convert(*args, **kwargs)


__all__ = ["ConversionError", "convert_hf_to_mcore", "convert_mcore_to_hf"]

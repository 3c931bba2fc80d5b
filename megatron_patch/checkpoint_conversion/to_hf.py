"""Megatron checkpoint (base model or training run, any TP/PP) -> HF checkpoint directory.

Output: ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json`` with the
published key names, ``config.json`` and the tokenizer/processor files.

What to write is resolved from what the checkpoint remembers, each overridable on the command
line: the model config (``--model``; else the conversion record, the run's run_config.json, or
its ``--model`` argument), the key layout and dtype (the source HF checkpoint's, from the
conversion record; else flat ``visual.*``/``model.*`` keys and the checkpoint's dtype), the
config.json template (the source's own config.json) and the tokenizer (``--tokenizer-path``;
else the converted directory, else the run's ``--tokenizer-path``).

Memory: tensors are read about ``read_batch_bytes`` at a time (``mcore_reader``), converted and
streamed into their shard file (``hf_files.ShardedWriter``), so the peak is one batch plus the
largest tensor -- whatever the checkpoint's or the shards' size, and without loading the
optimizer state a run checkpoint also holds.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from tqdm import tqdm

from megatron_patch.checkpoint_conversion import runtime
from megatron_patch.checkpoint_conversion.errors import ConversionError
from megatron_patch.checkpoint_conversion.hf_config import config_from_dict, hf_config_for
from megatron_patch.checkpoint_conversion.hf_files import (ShardedWriter, copy_side_files, dtype_name,
                                                           parse_dtype, pipeline_outputs_in)
from megatron_patch.checkpoint_conversion.mcore_reader import CheckpointReader, checkpoint_layout
from megatron_patch.checkpoint_conversion.record import find_record, run_args, run_model_config
from megatron_patch.model import hf_mapping
from megatron_patch.model.configs import LlavaOVConfig, get_config
from megatron_patch.sizes import human_bytes
from megatron_patch.training import checkpoint_paths

logger = logging.getLogger("megatron_patch.convert")
_RUN_OVERRIDES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vision_num_layers", "vision_hidden_size")


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read size {text!r} (use e.g. 5GB or 500MB)")
    unit = match.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def resolve_config(model: Union[str, LlavaOVConfig, None], checkpoint: str,
                   record: Optional[Dict[str, Any]]) -> LlavaOVConfig:
    if isinstance(model, LlavaOVConfig):
        return model
    if model:
        return get_config(model)
    if record and record.get("model_config"):
        return config_from_dict(record["model_config"])
    logged = run_model_config(checkpoint)
    if logged:
        return config_from_dict(logged)
    args = run_args(checkpoint)
    if args.get("model"):
        return get_config(args["model"], {key: args.get(key) for key in _RUN_OVERRIDES})
    raise ConversionError(f"cannot tell which model {checkpoint} holds (no conversion record, no run "
                          "config): pass --model")


def _recorded_model_hint(model, cfg: LlavaOVConfig, checkpoint: str, record: Dict[str, Any]) -> str:
    """When --model overrides what the checkpoint records, the recorded one (shapes that do not
    match then most likely come from the override)."""
    recorded = record.get("model") or run_args(checkpoint).get("model")
    if not model or not recorded or recorded == cfg.name:
        return ""
    return f"\nthe checkpoint records --model {recorded}: pass that, or leave --model out"


def _tokenizer_dir(explicit: Optional[str], record_dir: Optional[str],
                   checkpoint: str) -> Optional[str]:
    candidates = [explicit, os.path.dirname(os.path.abspath(record_dir)) if record_dir else None,
                  run_args(checkpoint).get("tokenizer_path")]
    for path in candidates:
        if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    if explicit:
        raise ConversionError(f"--tokenizer-path {explicit} is not a directory with tokenizer.json")
    return None


def _special_ids(tokenizer_dir: Optional[str], checkpoint: str) -> Optional[Dict[str, int]]:
    """The tokenizer's special ids, once it is known to be the one the checkpoint was made with
    (another one, shipped beside the weights, would turn every later check green on garbage)."""
    if tokenizer_dir is None:
        return None
    from megatron_patch.data.tokenizer import SFTTokenizer
    from megatron_patch.training.checkpoint_match import check_tokenizer_fits
    from megatron_patch.training.checkpointing import TokenizerMismatchError
    try:
        tokenizer = SFTTokenizer(tokenizer_dir)
    except ValueError:
        return None
    try:
        check_tokenizer_fits(checkpoint, tokenizer)
    except TokenizerMismatchError as error:
        raise ConversionError(str(error)) from None
    return tokenizer.special_ids


def _batches(entries: List[Tuple[hf_mapping.Item, int]], budget: int) -> List[List[hf_mapping.Item]]:
    batches, current, size = [], [], 0
    for item, nbytes in entries:
        if current and size + nbytes > budget:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return batches + ([current] if current else [])


def convert_mcore_to_hf(load: str, out: str, model: Union[str, LlavaOVConfig, None] = None,
                        tokenizer_path: Optional[str] = None, dtype: str = "auto",
                        key_layout: str = "auto", max_shard_size="5GB", overwrite: bool = False,
                        progress: bool = True, read_batch_bytes: int = 2**29) -> str:
    """Exports the newest complete checkpoint under ``load`` (or that ``iter_*`` dir) to ``out``."""
    started = time.time()
    try:
        choice = checkpoint_paths.choose_checkpoint(load)
    except FileNotFoundError as exc:  # an iter_* dir without its COMPLETE marker
        raise ConversionError(str(exc)) from None
    if choice.path is None:
        if not os.path.exists(load):
            raise ConversionError(f"--load {load} does not exist")
        why = "; ".join(choice.notes) or ("it holds no iter_* checkpoint folder: give a run folder "
                                          "or one of its iter_* folders")
        raise ConversionError(f"no complete checkpoint under {load}: {why}")
    checkpoint = choice.path
    record, record_dir = find_record(checkpoint)
    record = record or {}
    cfg = resolve_config(model, checkpoint, record)
    tokenizer_dir = _tokenizer_dir(tokenizer_path, record_dir, checkpoint)
    special_ids = _special_ids(tokenizer_dir, checkpoint)
    if special_ids:
        cfg.image_token_id = special_ids["<|image_pad|>"]
        cfg.video_token_id = special_ids["<|video_pad|>"]

    reader = CheckpointReader(checkpoint)
    layout = checkpoint_layout(runtime.build_unsharded_model(cfg, torch.float32, meta=True))
    try:
        reader.validate(layout, f"model {cfg.name}")
    except ConversionError as error:
        raise ConversionError(f"{error}{_recorded_model_hint(model, cfg, checkpoint, record)}") \
            from None
    out_dtype = parse_dtype(dtype) or parse_dtype(record.get("dtype")) or \
        reader.dtype(layout["language_model.embedding.word_embeddings.weight"].key)
    key_layout = key_layout if key_layout != "auto" else record.get("hf_key_layout", "flat")
    if key_layout not in hf_mapping.HF_LAYOUTS:
        raise ConversionError(f"--key-layout must be one of auto, {', '.join(hf_mapping.HF_LAYOUTS)}")
    _prepare_output(out, overwrite)
    logger.info("exporting %s (%s) to %s: %s keys, %s", checkpoint, cfg.name, out, key_layout,
                dtype_name(out_dtype))
    writer = _write_weights(reader, layout, cfg, out, out_dtype, key_layout,
                            parse_size(max_shard_size), read_batch_bytes, progress)

    hf_config = hf_config_for(cfg, dtype_name(out_dtype), record.get("hf_config"), special_ids)
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(hf_config, handle, indent=2)
        handle.write("\n")
    copied = copy_side_files(tokenizer_dir, out) if tokenizer_dir else []
    if not copied:
        looked = [path for path in (tokenizer_path, run_args(checkpoint).get("tokenizer_path"))
                  if path]
        logger.warning("no tokenizer files found to copy%s: the export cannot be used without "
                       "one; rerun with --tokenizer-path <the tokenizer the run was trained with>",
                       f" (looked in {', '.join(looked)})" if looked else "")
    logger.info("wrote %d shards (%s) to %s in %.1f s", len(writer.shards),
                human_bytes(writer.total_bytes), out, time.time() - started)
    return out


def _write_weights(reader: CheckpointReader, layout, cfg: LlavaOVConfig, out: str,
                   out_dtype: torch.dtype, key_layout: str, shard_bytes: int, read_batch_bytes: int,
                   progress: bool) -> ShardedWriter:
    """Reads the checkpoint a batch at a time, splits each tensor into its HF tensors (the mapping
    table) and streams them into the shard files."""
    def nbytes(item):
        loc = layout[item.mcore]
        return torch.Size(loc.shape).numel() * torch.empty((), dtype=reader.dtype(loc.key)).element_size()

    entries = [(item, nbytes(item)) for item in hf_mapping.items(cfg)]
    plan = [(hf_mapping.hf_name_in_layout(name, key_layout), shape, out_dtype)
            for item, _ in entries
            for name, shape in zip(item.hf, hf_mapping.hf_shapes(item, layout[item.mcore].shape, cfg))]
    writer = ShardedWriter(out, plan, shard_bytes)
    with tqdm(total=sum(n for _, n in entries), unit="B", unit_scale=True,
              desc="exporting weights", disable=not progress) as bar:
        for batch in _batches(entries, read_batch_bytes):
            tensors = reader.read((item.mcore, layout[item.mcore]) for item in batch)
            for item in batch:
                tensor = tensors.pop(item.mcore)
                bar.update(tensor.nbytes)
                for name, part in zip(item.hf, hf_mapping.split_to_hf(item, tensor, cfg)):
                    writer.add(hf_mapping.hf_name_in_layout(name, key_layout), part.to(out_dtype))
    writer.finish()
    return writer


def _prepare_output(out: str, overwrite: bool) -> None:
    foreign = pipeline_outputs_in(out)
    if foreign:
        raise ConversionError(f"--out {out} holds {' and '.join(foreign)}; write the HF model to "
                              "a folder of its own")
    if os.path.isdir(out):
        existing = [n for n in os.listdir(out) if n.endswith(".safetensors") or n == "config.json"]
        if existing and not overwrite:
            raise ConversionError(f"{out} already holds a HF checkpoint; pass --overwrite to replace it")
        for name in existing:
            os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)

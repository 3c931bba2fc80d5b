"""HF checkpoint directory -> megatron base-model checkpoint the trainer ``--load``s.

Output (``OUT``)::

    OUT/iter_0000000/                       dist-checkpoint of {"model": sharded_state_dict}
    OUT/iter_0000000/COMPLETE               marker (checkpoint_paths.publish)
    OUT/iter_0000000/hf_conversion.json     source config.json, key layout, dtype (for export),
                                            model config and tokenizer fingerprint (checked at --load)
    OUT/latest_checkpointed_iteration.txt   tracker = 0
    OUT/tokenizer.json, ...                 tokenizer/processor files, so --tokenizer-path OUT works

No ``run_state.json``: the trainer treats it as a base model (weights only, starts at iteration 0,
fresh optimizer) and reshards it to its own TP/PP while loading.

Memory: the model is built once at the checkpoint's dtype without initialisation, and filled
tensor by tensor from the safetensors shards (``hf_stream``), so the peak is about one copy of
the weights plus the tensor being fused -- the HF state dict is never held as a whole.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Union

import torch
from tqdm import tqdm

from megatron_patch.checkpoint_conversion import hf_stream, runtime
from megatron_patch.checkpoint_conversion.errors import ConversionError
from megatron_patch.checkpoint_conversion.hf_config import check_config, read_hf_config
from megatron_patch.checkpoint_conversion.hf_files import copy_side_files, dtype_name, parse_dtype
from megatron_patch.checkpoint_conversion.parallel_check import check_parallel_layout
from megatron_patch.checkpoint_conversion.record import write_record
from megatron_patch.compat import checkpoint_writer
from megatron_patch.model.configs import LlavaOVConfig
from megatron_patch.sizes import human_bytes
from megatron_patch.training import checkpoint_paths

logger = logging.getLogger("megatron_patch.convert")
BASE_ITERATION = 0


def _tokenizer_fingerprint(hf_dir: str, hf_config: Dict[str, Any],
                           vocab_size: int) -> Optional[Dict[str, Any]]:
    """The tokenizer's fingerprint (SFTTokenizer.fingerprint), after checking its special ids
    against config.json (None without a tokenizer.json). Recorded, so that training or evaluating
    this base model with another tokenizer is refused."""
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        logger.warning("no tokenizer.json in %s: pass --tokenizer-path to the trainer yourself", hf_dir)
        return None
    from megatron_patch.data.tokenizer import SFTTokenizer
    try:
        tokenizer = SFTTokenizer(hf_dir)
    except ValueError as exc:  # lacks the chat/vision special tokens
        logger.warning("tokenizer in %s is not usable for SFT: %s", hf_dir, exc)
        return None
    problems = []
    image_id = hf_config.get("image_token_id")
    if image_id is not None and image_id != tokenizer.image_pad_id:
        problems.append(f"config.json image_token_id is {image_id} but the tokenizer's <|image_pad|> "
                        f"is {tokenizer.image_pad_id}")
    if tokenizer.vocab_size > vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size} embeddings")
    if problems:
        raise ConversionError(f"tokenizer and weights in {hf_dir} do not belong together: "
                              + "; ".join(problems))
    return tokenizer.fingerprint()


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.isdir(os.path.join(out, ".nv-meta")):
        raise ConversionError(f"--out {out} holds a converted dataset (.nv-meta); write the "
                              "converted model to a folder of its own")
    iterations = checkpoint_paths.complete_iterations(out)
    others = [i for i in iterations if i != BASE_ITERATION]
    if others:
        raise ConversionError(f"{out} already holds training checkpoints (iterations {others}); "
                              "write the converted model to a directory of its own")
    if iterations and not overwrite:
        raise ConversionError(f"{out} already holds a converted model; pass --overwrite to replace it")


def convert_hf_to_mcore(hf_dir: str, out: str, model: Union[str, LlavaOVConfig, None] = None,
                        tp: int = 1, pp: int = 1, dtype: str = "auto", overwrite: bool = False,
                        progress: bool = True) -> str:
    """Converts ``hf_dir`` into a base checkpoint under ``out``; returns the iter_0000000 path.

    ``model``: preset name or config (default: the preset matching config.json). ``tp``/``pp``:
    the layout the user will train with, validated here (the files do not depend on it, see
    ``runtime``). ``dtype``: parameter dtype to store (default: the checkpoint's own)."""
    started = time.time()
    if os.path.realpath(out) == os.path.realpath(hf_dir):
        raise ConversionError(f"--out {out} is the --hf-dir itself: the base checkpoint needs a "
                              "folder of its own")
    hf_config = read_hf_config(hf_dir)
    cfg, notes = check_config(hf_config, model)
    for note in notes:
        logger.info("config: %s", note)
    tokenizer = _tokenizer_fingerprint(hf_dir, hf_config, cfg.language.vocab_size)
    _check_output(out, overwrite)
    checkpoint_writer.start()  # its 2-3 s of setup overlap the reading below

    shapes = {n: tuple(p.shape) for n, p in
              runtime.build_unsharded_model(cfg, torch.float32, meta=True).named_parameters()}
    check_parallel_layout(cfg, shapes, tp, pp)
    text_config = hf_config.get("text_config") or {}
    tied = bool(text_config.get("tie_word_embeddings", hf_config.get("tie_word_embeddings", False)))
    hf_plan = hf_stream.plan(hf_dir, cfg, shapes, tie_word_embeddings=tied)
    params_dtype = parse_dtype(dtype) or hf_plan.dominant_dtype()
    logger.info("converting %s (%s, %s of weights, %s keys) to %s at %s", hf_dir, cfg.name,
                human_bytes(hf_plan.total_bytes), hf_plan.layout, out, dtype_name(params_dtype))

    megatron_model = runtime.build_unsharded_model(cfg, params_dtype)
    params = dict(megatron_model.named_parameters())
    casts: List[str] = []
    with torch.no_grad(), tqdm(total=hf_plan.total_bytes, unit="B", unit_scale=True,
                               desc="reading HF weights", disable=not progress) as bar:
        for name, tensor in hf_stream.stream(hf_plan, bar.update):
            if tensor.dtype != params_dtype:
                casts.append(name)
            params[name].copy_(tensor)
    if casts:
        logger.warning("%d tensors cast to %s (e.g. %s)", len(casts), dtype_name(params_dtype), casts[0])

    final = _save_base_checkpoint(megatron_model, out, {
        "format": 1, "source": os.path.abspath(hf_dir), "model": cfg.name,
        "model_config": cfg.to_dict(), "hf_config": hf_config, "hf_key_layout": hf_plan.layout,
        "dtype": dtype_name(params_dtype), "tied_embeddings": hf_plan.tied,
        "ignored_hf_tensors": hf_plan.ignored, "intended_tp": tp, "intended_pp": pp,
        "tokenizer": tokenizer})
    copied = copy_side_files(hf_dir, out)
    logger.info("wrote %s in %.1f s; copied %s into %s", final, time.time() - started,
                ", ".join(copied) or "no tokenizer files", out)
    return final


def _release_factory_views(sharded: Dict[str, Any]) -> None:
    """Builds megatron's sharded-tensor factories now, each piece on its own storage, and frees
    the parameter they were cut from.

    The SwiGLU ``linear_fc1`` factory saves gate and up as two *views* of the fused parameter,
    and megatron's checkpoint writer clones every view before writing -- a second copy of all
    fc1 weights (3.6 GB for the 4B, 7.2 GB for the 8B) on top of the model. Cloning one layer's
    halves ourselves and releasing the fused storage right away keeps the peak at one copy.
    The model is not used after saving, so emptying its storage is safe."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for name, entry in list(sharded.items()):
        if isinstance(entry, ShardedTensorFactory):
            pieces = entry.build()
            for piece in pieces:
                piece.data = piece.data.clone()
            entry.data.untyped_storage().resize_(0)
            sharded[name] = pieces


def _save_base_checkpoint(model: torch.nn.Module, out: str, record: Dict[str, Any]) -> str:
    from megatron.core import dist_checkpointing

    os.makedirs(out, exist_ok=True)
    partial = checkpoint_paths.partial_dir(out, BASE_ITERATION, f"convert-{os.getpid()}")
    os.makedirs(partial)
    logger.info("writing the dist-checkpoint to %s", partial)
    sharded = model.sharded_state_dict()
    _release_factory_views(sharded)
    checkpoint_writer.wait()
    dist_checkpointing.save({"model": sharded}, partial)
    write_record(partial, record)
    return checkpoint_paths.publish(out, partial, BASE_ITERATION)

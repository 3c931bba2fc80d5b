"""Refusing, before the model is built, a checkpoint that this run's model or tokenizer does not fit.

Two records say what a checkpoint was made with: a run checkpoint's ``run_state.json`` (the
trainer's arguments and its tokenizer's fingerprint) and a converted base model's
``hf_conversion.json`` (the preset and model config it was converted as, and the fingerprint of
the tokenizer beside it). Without this check another model fails only after it is built, with
megatron's shape error and a resume hint that cannot help; another tokenizer of the same size
does not fail at all: the model reads ids it never learned and training or evaluation goes on,
producing garbage. A resume also needs the data loader and the optimizer's parameter groups
built as they were saved, and the same train data (megatron and energon fail deep inside, or
go on silently, otherwise). Checkpoints with no record (older runs) are let through.

`check_save_folder` guards the other side: a --save holding checkpoints later than where the
run starts, which it would overwrite or interleave with.
"""
import argparse
import os
from typing import Any, Dict, List, Optional

from megatron_patch.checkpoint_conversion.record import find_record
from megatron_patch.data.blends import train_data_fingerprint
from megatron_patch.data.tokenizer import SFTTokenizer, fingerprint_differences
from megatron_patch.training import arguments, checkpoint_paths
from megatron_patch.training.checkpointing import (NEW_RUN_FROM_ITS_WEIGHTS,
                                                   CheckpointLayoutError, ModelMismatchError,
                                                   TokenizerMismatchError, read_run_state)
from megatron_patch.training.optimizer import module_learning_rates

# the config fields that decide the weights' shapes (LlavaOVConfig.to_dict's sections)
SHAPE_FIELDS = {
    "language": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "head_dim", "vocab_size"),
    "vision": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "patch_size"),
}
SIZE_KEYS = tuple(name.replace("-", "_") for name in arguments.MODEL_SIZE_OPTIONS)


class SaveFolderInUse(CheckpointLayoutError):
    """--save holds checkpoints past the iteration this run starts from."""


def check_save_folder(args) -> None:
    """Refuses a --save that holds checkpoints later than where this run starts. A fresh run
    would write over them and their metrics; a run resumed from an earlier one (a rollback)
    would save between them, and --keep-last or the next restart would take the abandoned
    timeline's newest."""
    if not args.save or not os.path.isdir(args.save):
        return
    saved = checkpoint_paths.complete_iterations(args.save)
    start, path = 0, None
    if args.load and not args.finetune:
        choice = checkpoint_paths.choose_checkpoint(args.load)
        path = choice.path
        if path is not None and read_run_state(path) is not None:
            start = choice.iteration
    later = [iteration for iteration in saved if iteration > start]
    if not later:
        return
    shown = ", ".join(checkpoint_paths.iteration_dir_name(i) for i in later[-3:])
    if start:
        raise SaveFolderInUse(
            f"--load {path} resumes at iteration {start}, and --save {args.save} holds later "
            f"checkpoints ({shown}{', ...' if len(later) > 3 else ''}): the run would save "
            "between them, and a restart would resume the newest. To roll back, move the later "
            "ones out of the folder first, or save to another folder")
    fix = (f"{path} has no run_state.json (damaged, or a base model put there) and cannot be "
           "resumed: move it out of the folder and rerun to resume from the newest one left, "
           "or choose another --save" if path is not None and _same_folder(
               os.path.dirname(os.path.normpath(path)), args.save) else
           f"Resume that run with --load {args.save}, or choose another --save")
    raise SaveFolderInUse(
        f"--save {args.save} already holds checkpoints up to iteration {saved[-1]}, and this "
        f"run starts at iteration 0: it would overwrite them and their metrics. {fix}")


def _same_folder(one: str, other: str) -> bool:
    return os.path.realpath(one) == os.path.realpath(other)


def check_checkpoint_fits(load: str, args, cfg, tokenizer: SFTTokenizer,
                          resuming: bool = False) -> None:
    """Raises ModelMismatchError or TokenizerMismatchError when the checkpoint `--load` chooses
    was made with another model than `cfg` (built from `args`) or another tokenizer; when
    `resuming` its data position too, a CheckpointLayoutError when the loader it was saved from
    was built another way."""
    path = checkpoint_paths.choose_checkpoint(load).path
    if path is None:
        return
    run_state = read_run_state(path)
    # the converted base model's record: for a base model, or a run that recorded no tokenizer
    conversion = None if (run_state or {}).get("tokenizer") else find_record(path)[0]
    if run_state is not None:
        saved = run_state.get("args") or {}
        _check_run_model(load, path, saved, args)
        if resuming:
            _check_loader_settings(path, saved, args)
            _check_same_data(path, run_state.get("data"), args)
            _check_optimizer_groups(path, saved, args)
    elif conversion is not None:
        _check_converted_model(load, path, conversion, args, cfg)
    _check_tokenizer(path, run_state, conversion, tokenizer)


def check_tokenizer_fits(path: str, tokenizer: SFTTokenizer) -> None:
    """Raises TokenizerMismatchError when checkpoint `path` records another tokenizer (the HF
    exporter's check: the tokenizer it ships beside the weights)."""
    run_state = read_run_state(path)
    conversion = None if (run_state or {}).get("tokenizer") else find_record(path)[0]
    _check_tokenizer(path, run_state, conversion, tokenizer)


def _check_tokenizer(path: str, run_state: Optional[dict], conversion: Optional[dict],
                     tokenizer: SFTTokenizer) -> None:
    recorded = _recorded_tokenizer(run_state, conversion)
    if recorded is None:
        return
    differences = fingerprint_differences(recorded, tokenizer.fingerprint())
    if differences:
        made_with = (run_state or {}).get("args", {}).get("tokenizer_path") \
            or (conversion or {}).get("source")
        raise TokenizerMismatchError(
            f"--tokenizer-path {tokenizer.path} is not the tokenizer {path} was made with"
            f"{f' ({made_with})' if made_with else ''}: {'; '.join(differences)}. The model "
            "would read ids it never learned. Give the tokenizer it was trained with (the "
            "template's TOKENIZER_PATH; for a converted model, its --out folder)")


def _recorded_tokenizer(run_state: Optional[dict], conversion: Optional[dict]) -> Optional[dict]:
    """The fingerprint the checkpoint was made with: its run's, else the converted base model's
    (older conversion records hold the special ids only)."""
    if run_state and run_state.get("tokenizer"):
        return run_state["tokenizer"]
    if not conversion:
        return None
    if conversion.get("tokenizer"):
        return conversion["tokenizer"]
    special = conversion.get("special_token_ids")
    return {"special_token_ids": special} if special else None


def _check_run_model(load: str, path: str, saved: Dict[str, Any], args) -> None:
    """A run checkpoint: the preset and size flags its run_state.json records."""
    if "model" not in saved:
        return
    differ = [key for key in ("model", *SIZE_KEYS) if saved.get(key) != getattr(args, key, None)]
    if not differ:
        return

    def flags(values) -> str:
        return " ".join(f"--{key.replace('_', '-')} {values(key)}" for key in differ
                        if values(key) is not None) or "the preset's sizes"
    raise ModelMismatchError(
        f"--load {load}: {path} was trained with {flags(saved.get)}; this run asks for "
        f"{flags(lambda key: getattr(args, key, None))}. Build the same model (the template's "
        "MODEL and EXTRA_ARGS), or load a checkpoint of this one")


# what decides the stages of the data loader's pipeline (sft_loader.build_train_loader):
# energon restores a saved position only into the same stages (a toggled --packing failed with
# "Class name mismatch"); their sizes may change
LOADER_STAGES = {"--packing": lambda values: bool(values.get("packing")),
                 "--shuffle-buffer-size > 1": lambda values: (values.get("shuffle_buffer_size")
                                                              or 0) > 1}


def _check_loader_settings(path: str, saved: Dict[str, Any], args) -> None:
    if not all(key in saved for key in ("packing", "shuffle_buffer_size")):
        return  # not recorded
    asked = vars(args)
    differ = [(name, stage(saved), stage(asked)) for name, stage in LOADER_STAGES.items()
              if stage(saved) != stage(asked)]
    if differ:
        raise CheckpointLayoutError(
            f"{path} holds the data position of a loader built with "
            f"{', '.join(f'{name}: {was}' for name, was, _ in differ)}; this run asks for "
            f"{', '.join(f'{name}: {now}' for name, _, now in differ)}, and energon can restore "
            "a position only into a loader built the same way. Resume with the same data "
            f"settings, or {NEW_RUN_FROM_ITS_WEIGHTS}")


def _check_same_data(path: str, saved: Optional[dict], args) -> None:
    """The saved data position counts into the data it was saved with: with more data a resume
    went on silently (in another order), with less it failed in a loader worker."""
    if not saved:
        return  # not recorded
    data_path = args.data_path
    now = train_data_fingerprint(data_path)
    if not now or saved.get("digest") == now["digest"]:
        return
    was = f"{saved.get('train_samples')} samples in {saved.get('train_shards')} shards"
    is_now = f"{now['train_samples']} samples in {now['train_shards']} shards"
    raise CheckpointLayoutError(
        f"--data-path {data_path} is not the data {path} was trained on: its train split had "
        f"{was}, now {is_now}" + (" (other shards or blend weights)" if was == is_now else "")
        + ". Its data position cannot be resumed into other data: resume with the data it was "
        f"trained on, or {NEW_RUN_FROM_ITS_WEIGHTS}")


def _optimizer_groups(values: Dict[str, Any]) -> Dict[str, float]:
    """Each trainable module's learning rate relative to --lr: what megatron's parameter groups
    (and so the optimizer state's layout) are made of."""
    rates = module_learning_rates(argparse.Namespace(
        **{key: values.get(key) for key in ("lr", "lr_vision", "lr_adapter")}))
    return {module: rates[module] / values["lr"] for module in sorted(values["trainable_modules"])}


def _check_optimizer_groups(path: str, saved: Dict[str, Any], args) -> None:
    if not saved.get("trainable_modules") or not saved.get("lr"):
        return  # not recorded
    was, now = _optimizer_groups(saved), _optimizer_groups(vars(args))
    if was != now:
        def show(groups) -> str:
            return ", ".join(f"{module} x{ratio:g}" for module, ratio in groups.items())
        raise CheckpointLayoutError(
            f"{path} holds the optimizer state of trainable modules {show(was)} (learning rate "
            f"relative to --lr); this run asks for {show(now)}, and megatron restores optimizer "
            "state only into the same parameter groups. Resume with the same "
            f"--trainable-modules / --lr-vision / --lr-adapter, or {NEW_RUN_FROM_ITS_WEIGHTS}")


def _check_converted_model(load: str, path: str, record: dict, args, cfg) -> None:
    """A converted base model: the shapes of the model config it was converted as."""
    saved = record.get("model_config") or {}
    wanted = cfg.to_dict()
    differ: List[str] = [
        f"{section} {field} {saved[section][field]} (this run's: {wanted[section][field]})"
        for section, fields in SHAPE_FIELDS.items() for field in fields
        if field in saved.get(section, {}) and saved[section][field] != wanted[section][field]]
    if differ:
        raise ModelMismatchError(
            f"--load {load}: {path} was converted as --model {record.get('model')}, this run "
            f"builds --model {args.model}; they differ in {', '.join(differ)}. Train with "
            f"--model {record.get('model')} (the template's MODEL), or convert the model you "
            "mean to train")

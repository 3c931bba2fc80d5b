"""The trainer's data loaders: energon savable loaders over converted shards, and their state.

- `check_manifest` runs before training: energon does not notice tars changed after `prepare`
  (a shrunk tar fails mid-run, a rewritten one silently reads wrong bytes), so each dataset
  folder is compared with the converter's manifest.
- `build_train_loader` shards the train split over data-parallel ranks only (tensor- and
  pipeline-parallel peers of a replica must see the same batches, so they pass the same dp rank),
  repeats forever and takes its shuffling seeds from `seed`: the same seed gives the same batches.
- `save_loader_state` / `restore_loader_state` wrap energon's per-rank state and record how many
  workers produced it: energon can only resume with the same number (it fails with a bare
  AssertionError otherwise), so we say so in words.
"""
import copy
import functools
import logging
import os
from typing import Any, Dict, List, Optional

import torch
import yaml
from megatron.energon import (WorkerConfig, get_loader, get_savable_loader, get_train_dataset,
                              get_val_dataset)

from megatron_patch.data.blends import dataset_folders
from megatron_patch.data.energon_index import META_DIR
from megatron_patch.data.shard_scan import check_shard_files, load_manifest, read_split_layout
from megatron_patch.parent_watch import deaf_while_the_rank_runs, rank_exit_flag

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class DatasetChangedError(RuntimeError):
    """Shards on disk differ from what the converter recorded in its manifest."""


class LoaderStateMismatch(ValueError):
    """A saved data-loader state that this loader cannot resume from."""


# ---------------------------------------------------------------------- manifest check
def check_manifest(data_path: str) -> List[str]:
    """Checks every converted dataset under `data_path` (a dataset folder, or an energon
    metadataset yaml whose `path:` entries are followed) against its manifest; returns the
    folders checked. Folders without a manifest are accepted as they are."""
    checked: List[str] = []
    for folder in dataset_folders(str(data_path)):
        manifest = load_manifest(folder)
        if manifest is None:
            continue
        problems = check_shard_files(folder, read_split_layout(folder), manifest)
        if problems:
            listing = "\n  ".join(str(p) for p in problems)
            raise DatasetChangedError(
                f"dataset {folder} changed after conversion (its shards no longer match "
                f"{META_DIR}/llava_manifest.json):\n  {listing}\nenergon would not notice this and "
                "could read wrong or missing samples; re-run the conversion for this dataset (or "
                "restore the original shards)")
        checked.append(folder)
    return checked


# ---------------------------------------------------------------------- loaders
def _packing_buffer_size(task_encoder) -> Optional[int]:
    settings = getattr(task_encoder, "settings", None)
    return settings.packing_buffer_size if settings is not None and settings.packing else None


def _no_pin_memory_without_accelerator(loader):
    """energon always asks torch to pin memory; without a GPU torch warns on every iterator."""
    if not torch.accelerator.is_available():
        loader.pin_memory = False
    return loader


def _workers_deaf_to_job_stop_signals(loader):
    """The stop signal that reaches the whole job must leave the workers to the rank: killed by
    it, they took down the step the rank was finishing and the loader state its save asks them
    for (parent_watch)."""
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_init_worker, loader.worker_init_fn,
                                                  rank_exit_flag())
    return loader


def _init_worker(energon_init, exit_flag, worker_id: int) -> None:
    deaf_while_the_rank_runs(exit_flag)
    if energon_init is not None:
        energon_init(worker_id)


def build_train_loader(data_path: str, task_encoder, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, num_workers: int = 0, seed: int = 1234,
                       shuffle_buffer_size: Optional[int] = None, *,
                       max_samples_per_sequence: Optional[int] = 100):
    """An endless, resumable loader of micro-batches for this data-parallel rank.

    Order: energon cuts each rank's share into slices of `max_samples_per_sequence` consecutive
    samples and interleaves a few slices at a time, in an order shuffled per epoch; then
    `shuffle_buffer_size` mixes samples (across the epoch boundary too). Both draw from `seed`.
    """
    worker_config = WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers,
                                 seed_offset=seed)
    dataset = get_train_dataset(
        str(data_path), worker_config=worker_config, batch_size=micro_batch_size,
        packing_buffer_size=_packing_buffer_size(task_encoder),
        shuffle_buffer_size=shuffle_buffer_size if shuffle_buffer_size and shuffle_buffer_size > 1
        else None,
        max_samples_per_sequence=max_samples_per_sequence, task_encoder=task_encoder, repeat=True)
    # no watchdog: the time between batches includes the training step, minutes on a CPU
    loader = get_savable_loader(dataset, watchdog_timeout_seconds=None)
    return _workers_deaf_to_job_stop_signals(_no_pin_memory_without_accelerator(loader))


def build_val_loader(data_path: str, task_encoder, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, num_workers: int = 0):
    """One pass over the 'val' split (this rank's share), or None when there is none.

    The encoder is copied so that drops counted during evaluation never reach a training batch.
    Over-long samples dropped after the last val batch are not reported (no batch follows).
    """
    if not has_split(str(data_path)):
        fix = ("convert with --split, e.g. 95,5" if os.path.isdir(data_path) else
               "add a 'val:' blend of the members' val splits to the yaml")
        logger.info("evaluation: %s has no 'val' split (%s); skipping evaluation", data_path, fix)
        return None
    encoder = copy.copy(task_encoder)
    if hasattr(encoder, "reset_counters"):
        encoder.reset_counters()
    worker_config = WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers)
    dataset = get_val_dataset(
        str(data_path), split_part="val", worker_config=worker_config,
        batch_size=micro_batch_size, packing_buffer_size=_packing_buffer_size(encoder),
        task_encoder=encoder)
    return _workers_deaf_to_job_stop_signals(
        _no_pin_memory_without_accelerator(get_loader(dataset, watchdog_timeout_seconds=None)))


def has_split(data_path: str, split: str = "val") -> bool:
    """A dataset folder: its split.yaml lists shards for `split`. A metadataset (a blend): it
    names a blend for `split`."""
    if os.path.isdir(data_path):
        return bool(read_split_layout(data_path).get(split))
    try:
        with open(data_path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):
        return True  # let energon report what it makes of the path
    splits = config.get("splits") if isinstance(config, dict) else None
    return not isinstance(splits, dict) or bool(splits.get(split))


def close_loader(loader) -> None:
    """Stops a savable loader's worker processes now; the loader is unusable afterwards.

    energon keeps its running iterator in a reference cycle with the loader, so without this the
    workers stop only when the cycle is garbage-collected, and then torch waits its 5 s join
    timeout per worker before killing them (measured with energon 7.4.1, torch 2.13).
    """
    iterator = getattr(loader, "_epoch_iterator", None)
    if iterator is not None:
        iterator.close()
        loader._epoch_iterator = None


# ---------------------------------------------------------------------- state
def save_loader_state(loader) -> Dict[str, Any]:
    """This rank's loader state (picklable; torch.save it) with the settings resume depends on."""
    config = loader.worker_config
    return {"format": STATE_FORMAT, "num_workers": config.num_workers,
            "dp_rank": config.rank, "dp_size": config.world_size,
            "energon": loader.save_state_rank()}


def restore_loader_state(loader, state: Dict[str, Any], num_workers: int) -> None:
    """Restores `state` into a fresh (not yet iterated) loader built with the same arguments.

    Raises LoaderStateMismatch, in words, where energon would fail with a bare AssertionError or
    silently read other data: a different --num-workers or data-parallel size.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LoaderStateMismatch(
            f"unrecognised data-loader state (expected a dict from save_loader_state, format "
            f"{STATE_FORMAT}); was it written by another version?")
    saved = state["num_workers"]
    if saved != num_workers or loader.worker_config.num_workers != num_workers:
        raise LoaderStateMismatch(
            f"the data-loader state was saved with --num-workers {saved}, but this run uses "
            f"--num-workers {num_workers}; energon can only resume exactly with the same number "
            f"of workers: rerun with --num-workers {saved} (or start the data order afresh by "
            "loading the checkpoint without its data-loader state)")
    dp_size = loader.worker_config.world_size
    if state["dp_size"] != dp_size:
        raise LoaderStateMismatch(
            f"the data-loader state was saved with data-parallel size {state['dp_size']}, but "
            f"this run has {dp_size}; each rank's share of the data differs, so the saved "
            "position does not apply: keep the same number of data-parallel ranks to resume")
    if state["dp_rank"] != loader.worker_config.rank:
        raise LoaderStateMismatch(
            f"this is the data-loader state of data-parallel rank {state['dp_rank']}, but it is "
            f"being restored on rank {loader.worker_config.rank}")
    loader.restore_state_rank(state["energon"])


__all__ = ["DatasetChangedError", "LoaderStateMismatch", "build_train_loader", "build_val_loader",
           "check_manifest", "close_loader", "restore_loader_state", "save_loader_state"]

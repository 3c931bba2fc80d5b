"""Saving and loading training state with megatron dist-checkpointing.

One checkpoint, ``$SAVE/iter_XXXXXXX/``, holds:

* the dist-checkpoint (model and optimizer shards, resharded on load when TP/PP change, plus
  the common items: iteration, scheduler state, run state) written by every rank together;
* ``rng/rank_XXXXX.pt``: each rank's python/numpy/torch/megatron RNG states;
* ``dataloader/dp_rank_XXXX.pt``: each data-parallel replica's energon loader state (written by
  its TP0/PP0 rank; every rank of the replica reads it back), mirrored to ``--dataloader-save``
  as ``train_dataloader_dprankXXX.pt`` where Megatron-LM users look for it;
* ``run_state.json``: iteration, consumed samples, counters and the arguments, readable by humans
  and marking the directory as a *run* checkpoint (a converted base model has none).

Everything is written into a ``.partial`` folder first and published by checkpoint_paths, so a
run killed mid-save never leaves a checkpoint that looks complete.
"""
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_patch.training import checkpoint_paths
from megatron_patch.training.parallel_setup import Ranks

logger = logging.getLogger("megatron_patch.train")

RUN_STATE_NAME = "run_state.json"


@dataclass
class RunState:
    """What the loop needs to continue where it stopped (besides weights, optimizer, data)."""
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    dropped_overlong: int = 0
    floating_point_operations: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadResult:
    path: Optional[str]
    resumed: bool                     # a run checkpoint with optimizer/scheduler/data state
    state: RunState
    loader_state: Optional[Any] = None
    notes: List[str] = field(default_factory=list)


def _unwrap(model_chunks):
    return [getattr(chunk, "module", chunk) for chunk in model_chunks]


def _model_sharded_state_dict(model_chunks) -> dict:
    (model,) = _unwrap(model_chunks)  # one chunk per rank (no virtual pipeline stages)
    return {"model": model.sharded_state_dict()}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_torch_save(obj, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _shared_tag() -> str:
    """The same partial-folder tag on every rank (rank 0's clock and pid)."""
    tag = [f"{int(time.time())}-{os.getpid()}"]
    dist.broadcast_object_list(tag, src=0)
    return tag[0]


def dataloader_file(directory: str, dp_rank: int) -> str:
    return os.path.join(directory, f"dp_rank_{dp_rank:04d}.pt")


def mirrored_dataloader_file(directory: str, dp_rank: int) -> str:
    return os.path.join(directory, f"train_dataloader_dprank{dp_rank:03d}.pt")


def save_checkpoint(save: str, model_chunks, optimizer, scheduler, state: RunState,
                    loader_state: Any, ranks: Ranks, args_dict: dict,
                    dataloader_mirror: Optional[str] = None, keep_last: Optional[int] = None) -> str:
    """Writes iter_XXXXXXX for `state.iteration` from all ranks; returns its final path."""
    iteration = state.iteration
    partial = checkpoint_paths.partial_dir(save, iteration, _shared_tag())
    if ranks.rank == 0:
        os.makedirs(partial, exist_ok=False)
    dist.barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["run_state"] = asdict(state)
    dist_checkpointing.save(sharded, partial)

    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{ranks.rank:05d}.pt"))
    if ranks.tp_rank == 0 and ranks.pp_rank == 0:
        os.makedirs(os.path.join(partial, "dataloader"), exist_ok=True)
        payload = {"iteration": iteration, "state": loader_state}
        torch.save(payload, dataloader_file(os.path.join(partial, "dataloader"), ranks.dp_rank))
        if dataloader_mirror:
            os.makedirs(dataloader_mirror, exist_ok=True)
            _atomic_torch_save(payload, mirrored_dataloader_file(dataloader_mirror, ranks.dp_rank))
    dist.barrier()

    final = os.path.join(save, checkpoint_paths.iteration_dir_name(iteration))
    if ranks.rank == 0:
        record = {"kind": "run", "world_size": ranks.world_size, "data_parallel_size": ranks.dp_size,
                  **asdict(state), "args": args_dict}
        with open(os.path.join(partial, RUN_STATE_NAME), "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=True, default=str)
        final = checkpoint_paths.publish(save, partial, iteration)
        if keep_last:
            for removed in checkpoint_paths.remove_old_checkpoints(save, keep_last):
                logger.info("removed old checkpoint %s (--keep-last %d)", removed, keep_last)
    dist.barrier()
    return final


def read_run_state(checkpoint_dir: str) -> Optional[dict]:
    path = os.path.join(checkpoint_dir, RUN_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def load_checkpoint(load: str, model_chunks, optimizer, scheduler, ranks: Ranks,
                    weights_only: bool = False) -> LoadResult:
    """Loads the newest complete checkpoint under `load` (or that iter_* dir).

    A run checkpoint resumes everything (weights, optimizer, scheduler, RNG, iteration, data
    position) unless `weights_only`; a base model (no run_state.json) loads weights and starts
    at iteration 0. Weights load at any TP/PP; full resume needs the saved data-parallel size.
    """
    choice = checkpoint_paths.choose_checkpoint(load)
    if choice.path is None:
        return LoadResult(None, False, RunState(), notes=choice.notes + [
            f"no complete checkpoint under {load}: starting from scratch"])
    record = read_run_state(choice.path)
    resume = record is not None and not weights_only
    sharded = _model_sharded_state_dict(model_chunks)
    if resume:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    loaded = dist_checkpointing.load(sharded, choice.path)
    (model,) = _unwrap(model_chunks)
    model.load_state_dict(loaded["model"], strict=True)
    notes = list(choice.notes)
    if not resume:
        why = "weights only (--no-load-optim)" if record is not None else "a base model"
        notes.append(f"loaded {choice.path}: {why}; starting at iteration 0")
        return LoadResult(choice.path, False, RunState(), notes=notes)

    if record.get("data_parallel_size") != ranks.dp_size:
        raise RuntimeError(
            f"{choice.path} was saved with data-parallel size {record.get('data_parallel_size')}, "
            f"this run has {ranks.dp_size}: the data position cannot be resumed exactly. Use the "
            "same GPUs/TP/PP, or pass --no-load-optim to start a new run from its weights")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    state = RunState(**loaded["run_state"])
    rng_file = os.path.join(choice.path, "rng", f"rank_{ranks.rank:05d}.pt")
    if record.get("world_size") == ranks.world_size and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        notes.append("RNG states not restored (different world size)")
    loader_file = dataloader_file(os.path.join(choice.path, "dataloader"), ranks.dp_rank)
    loader_state = torch.load(loader_file, weights_only=False)["state"]
    notes.append(f"resuming from {choice.path} at iteration {state.iteration} "
                 f"({state.consumed_samples} samples consumed)")
    return LoadResult(choice.path, True, state, loader_state, notes)

"""Saving and loading training state with megatron dist-checkpointing.

One checkpoint, ``$SAVE/iter_XXXXXXX/``, holds:

* the dist-checkpoint (model and optimizer shards, resharded on load when TP/PP change, plus
  the common items: iteration, scheduler state, run state) written by every rank together;
* ``rng/rank_XXXXX.pt``: each rank's python/numpy/torch/megatron RNG states;
* ``dataloader/dp_rank_XXXX.pt``: each data-parallel replica's energon loader state (written by
  its TP0/PP0 rank; every rank of the replica reads it back), mirrored to ``--dataloader-save``
  as ``train_dataloader_dprankXXX.pt`` where Megatron-LM users look for it;
* ``run_state.json``: iteration, consumed samples, counters, the optimizer state's layout, the
  arguments and the tokenizer's fingerprint, readable by humans and marking the directory as a
  *run* checkpoint (a converted base model has none).

The optimizer state is laid out one of three ways (``optimizer_format``): megatron's plain
optimizer stores it per parameter (``replicated``: resumable at any TP/PP); the distributed
optimizer stores either its own flat per-rank buffers (``dp_reshardable``, Megatron-LM's
default: no gathering at save, resumable at the same TP/PP only) or, with
``--dist-ckpt-optim-fully-reshardable``, per-parameter tensors gathered over the data-parallel
ranks (``fully_reshardable``: any TP/PP). A resume that cannot read the saved layout stops
before loading with a message that says what to change.

Everything is written into a ``.partial`` folder first and published by checkpoint_paths, so a
run killed mid-save never leaves a checkpoint that looks complete. A write that fails (full or
read-only disk) on any rank fails the save on every rank, removes the partial folder and raises
`CheckpointSaveError` naming the path, the free space and the space a checkpoint needs; the
previous checkpoint stays as it was.

With ``background`` (the trainer's --async-save) a forked process writes the shards while
training goes on, and the publishing runs later, once every rank's writer is done
(background_saves). Tensors held by several data-parallel replicas are written by all of them,
a share each (``fully_parallel``, Megatron-LM's --ckpt-fully-parallel-save), not all by the
first replica. One `SaveStrategy` serves a run's saves; with --ckpt-assume-constant-structure
the saves after the first reuse its checks and plans.
"""
import json
import logging
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.fully_parallel import \
    FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_patch.compat import checkpoint_writer, use_fused_adam
from megatron_patch.sizes import human_bytes
from megatron_patch.training import checkpoint_paths
from megatron_patch.training.background_saves import BackgroundSaves
from megatron_patch.training.fault_injection import fault_point
from megatron_patch.training.parallel_setup import Ranks, all_reduce_host

logger = logging.getLogger("megatron_patch.train")

RUN_STATE_NAME = "run_state.json"


REPLICATED, DP_RESHARDABLE, FULLY_RESHARDABLE = "replicated", "dp_reshardable", "fully_reshardable"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


# the way out when a run cannot be resumed as it is, in the trainer's and the template's terms
NEW_RUN_FROM_ITS_WEIGHTS = ("pass --finetune to start a new run from its weights (with the "
                            "template: CHECKPOINT_PATH=<that run> and a new SAVE_CKPT_PATH)")


class CheckpointLayoutError(RuntimeError):
    """The checkpoint cannot serve this run as it is (its optimizer state's layout, its
    data-parallel size; the subclasses below); the message says why. Rerunning the same command
    would not help, so no resume hint follows it."""


class DamagedCheckpointError(CheckpointLayoutError):
    """A file of the checkpoint cannot be read (truncated, missing); the message says which
    checkpoint to move away to resume from the one before."""


class ModelMismatchError(CheckpointLayoutError):
    """The checkpoint was trained as another model: its shapes would fail to load only after
    this one was built, with megatron's shape error and a resume hint that cannot help."""


class TokenizerMismatchError(CheckpointLayoutError):
    """The checkpoint was made with another tokenizer: of the same size, nothing would fail, and
    the model would read ids it never learned."""


class NothingToLoadError(CheckpointLayoutError):
    """--finetune asked for weights where there are none: training from random weights
    instead would look like success."""


def optimizer_format(use_distributed_optimizer: bool, fully_reshardable: bool = False) -> str:
    """How this run lays out its optimizer state in checkpoints (see the module doc)."""
    if not use_distributed_optimizer:
        return REPLICATED
    return FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE


def _optimizer_metadata(layout: str) -> dict:
    """megatron's sharded_state_dict metadata for `layout` (none for the plain optimizer, so its
    keys stay as they always were)."""
    if layout == REPLICATED:
        return {}
    # megatron gathers the fully reshardable form with NCCL on the GPU by default; its
    # "memory efficient" variant gathers over the gloo group instead, which CPU runs need
    return {"distrib_optim_sharding_type": layout,
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


@dataclass
class RunState:
    """What the loop needs to continue where it stopped (besides weights, optimizer, data)."""
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    dropped_overlong: int = 0
    bad_samples: int = 0              # samples skipped because they do not decode
    samples_read: int = 0             # samples the loader handed out, dropped and bad included
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


def _tracker_states() -> dict:
    """megatron's tracker states as byte tensors. With CUDA graphs (``--cuda-graph-impl local``)
    the tracker holds graph-safe generators instead of states; saving their states keeps a
    checkpoint resumable with or without graphs."""
    return {name: state.get_state() if isinstance(state, torch.Generator) else state
            for name, state in get_cuda_rng_tracker().get_states().items()}


def _restore_tracker(saved: dict) -> None:
    """Saved states into the tracker: into its generators where it holds graph-safe ones (the
    captured graphs refer to those objects), as plain states otherwise."""
    tracker = get_cuda_rng_tracker()
    live = tracker.get_states()
    states = {}
    for name, state in saved.items():
        generator = live.get(name)
        if isinstance(generator, torch.Generator):
            generator.set_state(state)
            state = generator
        states[name] = state
    tracker.set_states(states)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": _tracker_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> bool:
    """Restores the generators; the device ones (CUDA's and megatron's tracker, whose states are
    CPU generator states on CPU) only when saved on the same kind of device, as a CPU state does
    not fit a CUDA generator. Returns whether those were restored too."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved_on_cuda = "cuda" in state
    if saved_on_cuda != torch.cuda.is_available():
        return False
    _restore_tracker(state["tracker"])
    if saved_on_cuda:
        torch.cuda.set_rng_state(state["cuda"])
    return True


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


class SaveStrategy:
    """megatron's torch_dist writer, kept for a whole run's saves (as Megatron-LM keeps its
    strategy in the run's checkpointing context).

    With `fully_parallel` (--ckpt-fully-parallel-save), the tensors replicated over the
    data-parallel ranks are split among them for writing (each rank writes a share instead of
    the first replica writing all), so a save takes about 1/DP of the time where each node
    writes to its own storage bandwidth.

    With `assume_constant_structure` (--ckpt-assume-constant-structure) every save after the
    first skips the work only a change in the state's layout would redo, which costs seconds
    per save on thousands of ranks: megatron's check that every shard is written exactly once
    (each rank's shard list gathered and checked on rank 0), the split of the writes over the
    replicas (all-gathered and recomputed), and the save plan (each rank's plan gathered and
    the global metadata built on rank 0; megatron reuses it once two saves planned the same).
    A run's state keeps its layout from one save to the next (the same model, optimizer and
    parallelism), so this holds for every run of this trainer.
    """

    def __init__(self, fully_parallel: bool = True, assume_constant_structure: bool = False):
        self.fully_parallel = fully_parallel
        self.assume_constant_structure = assume_constant_structure
        self._strategy = None

    def for_next_save(self) -> Tuple[Any, bool]:
        """The strategy for the next save and whether megatron must validate its sharding."""
        first = self._strategy is None
        if first:
            self._strategy = self._build()
        return self._strategy, first or not self.assume_constant_structure

    def _build(self):
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1,
                                                cached_metadata=self.assume_constant_structure)
        if not self.fully_parallel:
            return strategy
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return FullyParallelSaveStrategyWrapper(strategy, group,
                                                do_cache_distribution=self.assume_constant_structure)


def save_checkpoint(save: str, model_chunks, optimizer, scheduler, state: RunState,
                    loader_state: Any, ranks: Ranks, args_dict: dict,
                    dataloader_mirror: Optional[str] = None, keep_last: Optional[int] = None,
                    layout: str = REPLICATED, strategy: Optional[SaveStrategy] = None,
                    background: Optional[BackgroundSaves] = None,
                    tokenizer_fingerprint: Optional[dict] = None,
                    data_fingerprint: Optional[dict] = None) -> str:
    """Writes iter_XXXXXXX for `state.iteration` from all ranks; returns its final path.

    With `background`, returns once the shards are copied to host memory and their writer is
    started; the checkpoint is published later by `background` (see background_saves).
    Raises CheckpointSaveError on every rank when any rank fails to write (see the module doc),
    in the background case from `background`'s poll or wait.
    """
    iteration, rank = state.iteration, ranks.rank
    partial = checkpoint_paths.partial_dir(save, iteration, _shared_tag())
    final = os.path.join(save, checkpoint_paths.iteration_dir_name(iteration))
    need = estimated_checkpoint_bytes(save, model_chunks, ranks) if rank == 0 else 0
    request = None

    def start():
        fault_point("save:start", iteration, rank)
        if rank == 0:
            check_free_space(save, need)
            os.makedirs(partial, exist_ok=False)

    def write_shards():
        nonlocal request
        sharded = _model_sharded_state_dict(model_chunks)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded,
                                                            metadata=_optimizer_metadata(layout))
        sharded["opt_param_scheduler"] = scheduler.state_dict()
        sharded["run_state"] = asdict(state)
        checkpoint_writer.wait()
        writer, validate = (strategy or SaveStrategy()).for_next_save()
        request = dist_checkpointing.save(sharded, partial, sharded_strategy=writer,
                                          validate_access_integrity=validate,
                                          async_sharded_save=background is not None)
        fault_point("save:after_model", iteration, rank)
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
        if ranks.tp_rank == 0 and ranks.pp_rank == 0:
            os.makedirs(os.path.join(partial, "dataloader"), exist_ok=True)
            payload = {"iteration": iteration, "state": loader_state}
            torch.save(payload, dataloader_file(os.path.join(partial, "dataloader"), ranks.dp_rank))
            if dataloader_mirror:
                os.makedirs(dataloader_mirror, exist_ok=True)
                _atomic_torch_save(payload, mirrored_dataloader_file(dataloader_mirror,
                                                                     ranks.dp_rank))
        fault_point("save:after_extras", iteration, rank)

    def publish():
        nonlocal final
        if rank != 0:
            return
        record = {"kind": "run", "world_size": ranks.world_size, "data_parallel_size": ranks.dp_size,
                  "tensor_parallel_size": ranks.tp_size, "pipeline_parallel_size": ranks.pp_size,
                  "optimizer_format": layout, **asdict(state), "args": args_dict,
                  "tokenizer": tokenizer_fingerprint, "data": data_fingerprint}
        with open(os.path.join(partial, RUN_STATE_NAME), "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=True, default=str)
        fault_point("save:before_publish", iteration, rank)
        final = checkpoint_paths.publish(
            save, partial, iteration,
            after_rename=lambda: fault_point("save:after_rename", iteration, rank))

    def publish_and_prune():
        _run_on_all_ranks(publish, save, partial, final, need)
        if rank == 0 and keep_last:
            for removed in checkpoint_paths.remove_old_checkpoints(save, keep_last):
                logger.info("removed old checkpoint %s (--keep-last %d)", removed, keep_last)
        dist.barrier()

    for phase in (start, write_shards):
        _run_on_all_ranks(phase, save, partial, final, need)
    if background is None:
        publish_and_prune()
        return final
    request.add_finalize_fn(publish_and_prune)
    background.schedule(request, iteration, final, rank,
                        on_failure=lambda cause: _save_failed(save, partial, final, need, cause))
    return final


def _run_on_all_ranks(phase, save: str, partial: str, final: str, need: int) -> None:
    """Runs one phase of a save on every rank; if it raised OSError on any rank, all ranks raise
    CheckpointSaveError (rank 0 first removes the partial folder)."""
    failure = None
    try:
        phase()
    except OSError as error:
        failure = error
    failed = all_reduce_host(torch.tensor([0 if failure is None else 1], dtype=torch.int32),
                             op=dist.ReduceOp.MAX)
    if int(failed):
        cause = f"{failure}" if failure is not None else "another rank could not write its part"
        raise _save_failed(save, partial, final, need, cause) from failure


def _save_failed(save: str, partial: str, final: str, need: int, cause: str) -> CheckpointSaveError:
    """Removes the partial folder (rank 0) and returns the error every rank raises: what
    failed (`cause`), the free space, the space needed and the checkpoint a rerun resumes from."""
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    free = _free_bytes(save)
    previous = checkpoint_paths.complete_iterations(save)
    kept = (f"the previous checkpoint {checkpoint_paths.iteration_dir_name(previous[-1])} is "
            "intact" if previous else "there is no earlier checkpoint")
    return CheckpointSaveError(
        f"could not write checkpoint {final}: {cause}. {save} has {_space(free)} free; a "
        f"checkpoint needs about {_space(need) if need else 'as much as the previous one'}. "
        f"Nothing was published and {kept}: free space (or point --save to a writable disk) "
        "and rerun the same command to resume")


def estimated_checkpoint_bytes(save: str, model_chunks, ranks: Ranks) -> int:
    """Size of the newest complete checkpoint in `save`, or, before the first one, the model's
    parameters x 3 (weights and Adam's two moments in fp32) across model-parallel ranks."""
    previous = checkpoint_paths.complete_iterations(save)
    if previous:
        return directory_bytes(os.path.join(save, checkpoint_paths.iteration_dir_name(previous[-1])))
    local = sum(p.numel() for chunk in _unwrap(model_chunks) for p in chunk.parameters())
    model_parallel = ranks.world_size // max(ranks.dp_size, 1)
    return 3 * 4 * local * model_parallel


def check_free_space(save: str, need: int) -> None:
    free = _free_bytes(save)
    if free is not None and need and free < need:
        raise OSError(28, f"No space left on device: {_space(free)} free in {save}, "
                          f"{_space(need)} needed (checked before writing)")


def _free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _space(count: Optional[int]) -> str:
    return "unknown space" if count is None else human_bytes(count)


def read_run_state(checkpoint_dir: str) -> Optional[dict]:
    path = os.path.join(checkpoint_dir, RUN_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def readable_optimizer_layout(record: dict, layout: str, ranks: Ranks, path: str) -> str:
    """The saved optimizer layout if this run (`layout`, `ranks`) can read it; else raises
    CheckpointLayoutError saying what to change. Records from before the layout was recorded
    hold the plain optimizer's state."""
    saved = record.get("optimizer_format", REPLICATED)
    if (saved == REPLICATED) != (layout == REPLICATED):
        wanted = "without" if saved == REPLICATED else "with"
        raise CheckpointLayoutError(
            f"{path} holds the optimizer state of a run {wanted} --use-distributed-optimizer "
            f"({saved}); this run uses {layout}. Run {wanted} --use-distributed-optimizer to "
            f"resume, or {NEW_RUN_FROM_ITS_WEIGHTS}")
    saved_layout = (record.get("tensor_parallel_size"), record.get("pipeline_parallel_size"))
    if saved == DP_RESHARDABLE and saved_layout != (ranks.tp_size, ranks.pp_size):
        raise CheckpointLayoutError(
            f"{path} holds the distributed optimizer's per-rank buffers for TP={saved_layout[0]} "
            f"PP={saved_layout[1]}; this run has TP={ranks.tp_size} PP={ranks.pp_size}. "
            f"Resume with the TP/PP it was saved with, or {NEW_RUN_FROM_ITS_WEIGHTS}; runs saving "
            "with --dist-ckpt-optim-fully-reshardable can change TP/PP")
    return saved


def _extra_states_absent_from(path: str, model_sharded: dict) -> List[str]:
    """The model's ``_extra_state`` entries (Transformer Engine modules' FP8 metadata) that the
    checkpoint lacks: one written with the local spec, as the HF converter writes, has none.
    Without FP8 they hold nothing, so such a checkpoint still loads. Costs one read of the
    checkpoint's metadata file per load (megatron's own linears keep an extra state too, so
    every model of ours asks)."""
    wanted = [name for name in model_sharded if name.endswith("_extra_state")]
    if not wanted:
        return []
    present = {item.key for item in load_sharded_metadata(path).values()}
    return [name for name in wanted if model_sharded[name].key not in present]


def _load_model_state(model, state: dict, absent_extra_states: List[str]) -> None:
    """``load_state_dict(strict=True)``, except for the extra states the checkpoint lacks."""
    if not absent_extra_states:
        model.load_state_dict(state, strict=True)
        return
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - set(absent_extra_states))
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                           f"unexpected {sorted(result.unexpected_keys)}")


def _read_checkpoint(sharded: dict, path: str, iteration: int) -> dict:
    """dist_checkpointing.load, with a damaged file named as such. torch reports a truncated
    shard as "CheckpointException ranks:dict_keys([0])", and the resume hint that followed sent
    every restart back to the same checkpoint."""
    try:
        return dist_checkpointing.load(sharded, path)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        cause = _unreadable_file_cause(error)
        if cause is None:
            raise
        folder = os.path.dirname(os.path.normpath(path))
        earlier = [i for i in checkpoint_paths.complete_iterations(folder) if i < iteration]
        then = (f"rerun to resume from the newest one left (iteration {earlier[-1]})" if earlier
                else "rerun (no earlier checkpoint is left: the run starts afresh)")
        what = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        raise DamagedCheckpointError(
            f"{path} cannot be read ({what}): a file of it is "
            f"truncated or missing, and every rerun would fail the same way. Move {path} out "
            f"of {folder}, then {then}") from error


def _unreadable_file_cause(error: BaseException) -> Optional[BaseException]:
    """The exception behind a load failure when it is a file that cannot be read, else None."""
    failures = getattr(error, "failures", None)
    causes = [pair[0] for pair in failures.values()] if isinstance(failures, dict) else [error]
    for cause in causes:
        while cause is not None:
            text = str(cause)
            if isinstance(cause, (EOFError, FileNotFoundError, pickle.UnpicklingError)) or (
                    isinstance(cause, RuntimeError) and any(
                        sign in text for sign in ("PytorchStreamReader", "unexpected EOF",
                                                  "truncated"))):
                return cause
            cause = cause.__cause__ or cause.__context__
    return None


def load_checkpoint(load: str, model_chunks, optimizer, scheduler, ranks: Ranks,
                    weights_only: bool = False, layout: str = REPLICATED) -> LoadResult:
    """Loads the newest complete checkpoint under `load` (or that iter_* dir).

    A run checkpoint resumes everything (weights, optimizer, scheduler, RNG, iteration, data
    position) unless `weights_only`; a base model (no run_state.json) loads weights and starts
    at iteration 0. Weights load at any TP/PP; full resume needs the saved data-parallel size.
    """
    choice = checkpoint_paths.choose_checkpoint(load)
    if choice.path is None and weights_only:
        skipped = "".join(f"; {note}" for note in choice.notes)
        raise NothingToLoadError(
            f"--load {load} --finetune: no complete checkpoint there{skipped}. Give a converted "
            "base model (tools/convert_hf_to_mcore.py --out) or a run folder or one of its iter_* "
            "folders (the template's CHECKPOINT_PATH); leave it empty to start from random "
            "weights")
    if choice.path is None:
        return LoadResult(None, False, RunState(), notes=choice.notes + [
            f"no complete checkpoint under {load}: starting from scratch"])
    record = read_run_state(choice.path)
    resume = record is not None and not weights_only
    sharded = _model_sharded_state_dict(model_chunks)
    if resume:
        saved_layout = readable_optimizer_layout(record, layout, ranks, choice.path)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata(saved_layout))
    absent_extra_states = _extra_states_absent_from(choice.path, sharded["model"])
    for name in absent_extra_states:
        del sharded["model"][name]
    loaded = _read_checkpoint(sharded, choice.path, choice.iteration)
    (model,) = _unwrap(model_chunks)
    _load_model_state(model, loaded["model"], absent_extra_states)
    notes = list(choice.notes)
    if absent_extra_states:
        notes.append(f"{len(absent_extra_states)} Transformer Engine _extra_state entries are not "
                     "in the checkpoint (saved without TE); those modules keep their defaults")
    if not resume:
        if optimizer is not None:  # its fp32 master weights were copied from the initial ones
            optimizer.reload_model_params()
        why = "weights only (--finetune)" if record is not None else "a base model"
        notes.append(f"loaded {choice.path}: {why}; starting at iteration 0")
        return LoadResult(choice.path, False, RunState(), notes=notes)

    if record.get("data_parallel_size") != ranks.dp_size:
        raise CheckpointLayoutError(
            f"{choice.path} was saved with data-parallel size {record.get('data_parallel_size')}, "
            f"this run has {ranks.dp_size}: the data position cannot be resumed exactly. Use the "
            f"same GPUs/TP/PP, or {NEW_RUN_FROM_ITS_WEIGHTS}")
    optimizer.load_state_dict(loaded["optimizer"])
    # torch's load replaced the groups' kernel flags with the saved ones, and the step
    # counters may be host tensors: this machine's choice again (a no-op on the CPU)
    use_fused_adam(optimizer)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    state = RunState(**loaded["run_state"])
    rng_file = os.path.join(choice.path, "rng", f"rank_{ranks.rank:05d}.pt")
    if record.get("world_size") == ranks.world_size and os.path.isfile(rng_file):
        if not _set_rng_state(torch.load(rng_file, weights_only=False)):
            notes.append("device RNG states not restored (saved on another kind of device)")
    else:
        notes.append("RNG states not restored (different world size)")
    loader_file = dataloader_file(os.path.join(choice.path, "dataloader"), ranks.dp_rank)
    loader_state = torch.load(loader_file, weights_only=False)["state"]
    notes.append(f"resuming from {choice.path} at iteration {state.iteration} "
                 f"({state.consumed_samples} samples consumed)")
    return LoadResult(choice.path, True, state, loader_state, notes)

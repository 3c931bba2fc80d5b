"""Process group, megatron parallel state and seeds: the first thing a training process does.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain `python train/...` run (no torchrun)
becomes a one-process group so the same code path runs everywhere. NCCL with CUDA, gloo without.
"""
import datetime
import gc
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patch.compat import apply_cpu_redirects


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    tp_size: int
    pp_size: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def is_logging_rank(self) -> bool:
        """The last rank holds the loss (last pipeline stage); rank 0 is where users look.
        We log from global rank 0 after reducing metrics to it."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(tp: int, pp: int, seed: int, timeout_minutes: float = 10.0,
               cuda_graphs: bool = False) -> Ranks:
    """`timeout_minutes` bounds every collective: a rank whose peer died or hangs fails after it
    (gloo raises; NCCL aborts via torch's watchdog) instead of waiting forever. `cuda_graphs`:
    the model will capture CUDA graphs (see :func:`seed_everything`)."""
    apply_cpu_redirects()  # no-op with CUDA
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain python: a world of one, on a port of its own
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 distributed_timeout_minutes=timeout_minutes)
    seed_everything(seed, cuda_graphs)
    return current_ranks()


def seed_everything(seed: int, cuda_graphs: bool = False) -> None:
    """Same seed on every rank: with CPU initialisation megatron builds the full weight and
    slices it, so the initial model is identical for every TP layout. Not across PP layouts:
    each stage builds only its own layers, each from the start of the same random stream
    (as in Megatron-LM), so to compare PP layouts start them from the same checkpoint (the
    tests do). With `cuda_graphs`
    megatron's RNG tracker keeps graph-safe generator states, which its graph manager
    requires (``--cuda-graph-impl local``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=cuda_graphs)


def current_ranks() -> Ranks:
    return Ranks(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage())


def collective_device() -> torch.device:
    """Where the trainer's own small collectives (stop flags, counters, loss sums) put their
    tensors: NCCL, the backend with CUDA, reduces CUDA tensors only, gloo host ones."""
    if dist.is_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``values`` (a host tensor) reduced over every rank, as a new host tensor. Also runs in a
    world of one, so a single-GPU run goes through the same NCCL path as a cluster job."""
    if not dist.is_initialized():
        return values.clone()
    buffer = values.to(collective_device(), copy=True)
    dist.all_reduce(buffer, op=op)
    return buffer.cpu()


def shutdown() -> None:
    """Ends the process groups, and with a garbage collection their threads: a destroyed gloo
    group keeps its ~50 native threads until its last reference cycle is collected, and a
    process that forks workers later (the converter's energon index, in the test suite) copies
    them in a state where the child can crash (measured: 106 threads after 3 in-process runs,
    10 with the collection)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()

"""The single-process megatron setup both converters need: a one-rank gloo group, TP=1/PP=1
parallel state, and the unsharded model (real, or on the meta device for its layout only).

Why one process at TP=1/PP=1 for any requested TP/PP: a megatron dist-checkpoint stores *global*
tensors cut into chunks, and every load re-cuts them for the loading run's TP/PP (the trainer's
``load_checkpoint`` does exactly that). A checkpoint written from one process is therefore the
same checkpoint a TP=N/PP=M job would write -- without N*M processes each holding its own copy
of the tensors they share, and with the same ``sharded_state_dict`` code path the trainer saves
with, so keys, layer stacking and SwiGLU factories cannot drift from what the trainer expects.
"""
from __future__ import annotations

import socket
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.checkpoint_conversion.errors import ConversionError
from megatron_patch.model.configs import LlavaOVConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_single_process_parallel_state() -> None:
    """A one-rank gloo group and TP=1/PP=1 parallel state (reused when already set up so)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from megatron_patch.compat import apply_cpu_redirects

    apply_cpu_redirects()  # no-op with CUDA
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError(f"run the converter as one process (world size is {dist.get_world_size()}); "
                              "it writes and reads TP/PP-independent dist-checkpoints from rank 0 alone")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) == (1, 1):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if "model-parallel-rng" not in get_cuda_rng_tracker().get_states():
        model_parallel_cuda_manual_seed(0)


def build_unsharded_model(cfg: LlavaOVConfig, dtype: torch.dtype, meta: bool = False,
                          device: Optional[str] = None):
    """The whole model at TP=1/PP=1, parameters uninitialised (they are overwritten anyway).

    ``meta=True`` allocates nothing: used to read names, shapes and the dist-checkpoint layout."""
    from megatron_patch.model.builder import build_model

    ensure_single_process_parallel_state()
    with torch.device("meta" if meta else (device or "cpu")):
        return build_model(cfg, attention_backend="local", params_dtype=dtype,
                           use_cpu_initialization=True, perform_initialization=False)

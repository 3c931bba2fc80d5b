"""CPU/gloo redirects for megatron-core 0.16.x, applied in one place.

megatron-core hard-codes the CUDA device in a handful of spots that the training path touches
(schedules, optimizer, grad clipping, DDP buffers, RNG tracker, P2P communication, the
optimizers' parameter sorting). Without a GPU those calls fail even though the maths is
device-agnostic. Each redirect below says which megatron call it serves and why the CPU
stand-in is correct. Measured against megatron-core 0.16.1 + torch 2.13 (CPU build); see
shared/reference/megatron_cpu/ for the prototype.

``apply()`` is idempotent and does nothing when CUDA is available: GPU runs use megatron as is.
"""
from __future__ import annotations

import functools
import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False

# Modules that build tensors with a literal device="cuda" (or torch.cuda.current_device()).
# Within each we swap the module-level name ``torch`` for a proxy whose tensor factories map
# device "cuda" to "cpu"; every other attribute falls through to the real torch.
_CUDA_FACTORY_MODULES = {
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens is created on 'cuda'",
    "megatron.core.optimizer.optimizer": "loss-scale and found_inf tensors are created on 'cuda'",
    "megatron.core.optimizer.clip_grads": "total_norm and the overflow buffer are created on 'cuda'",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers are allocated on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer": "shard buffers are allocated on 'cuda'",
    "megatron.core.utils": "local_multi_tensor_l2_norm returns a 'cuda' tensor",
}
_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _torch_with_cpu_factories() -> types.ModuleType:
    """A stand-in for ``torch`` whose tensor factories turn device 'cuda' into 'cpu'."""
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)

    def redirect(factory):
        def make(*args, device=None, **kwargs):
            return factory(*args, device="cpu" if _is_cuda(device) else device, **kwargs)

        make.__name__ = factory.__name__
        return make

    for name in _FACTORIES:
        setattr(proxy, name, redirect(getattr(torch, name)))
    return proxy


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 asserts grads are torch.cuda.FloatTensor and uses
    a multi-tensor CUDA kernel; on CPU the same scaling is a plain in-place multiply."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            grad = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
            if grad is not None:
                grad.detach().mul_(coeff)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def _sorting_cpu_tensors_as_cuda(init):
    """megatron's mixed-precision and distributed optimizers sort parameters into fp32 / 16-bit
    groups by their type name ('torch.cuda.FloatTensor', ...) when they are built, and reject
    any other name; while they are built, a CPU tensor answers with the CUDA name of its dtype,
    so the same groups are formed."""
    @functools.wraps(init)
    def build(self, *args, **kwargs):
        real_type = torch.Tensor.type

        def type_name(tensor, *type_args, **type_kwargs):
            name = real_type(tensor, *type_args, **type_kwargs)
            return name if type_args or type_kwargs else _CUDA_TYPE_NAMES.get(name, name)

        torch.Tensor.type = type_name
        try:
            return init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    return build


def apply() -> bool:
    """Install the redirects (once). Returns True when they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    cpu = torch.device("cpu")
    # p2p_communication, DDP buffers and RotaryEmbedding place tensors on current_device().
    torch.cuda.current_device = lambda: cpu
    # schedules/timers synchronize the device; CPU ops are already synchronous.
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron's RNG tracker forks "cuda" generator states for TP-local dropout/init; the CPU
    # generator plays that role (dropout is 0 in our configs, init happens on CPU).
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    proxy = _torch_with_cpu_factories()
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = proxy
    # the optimizer imported clip_grad_by_total_norm_fp32 by name, so patch it where it is used
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = (
        _clip_grad_by_total_norm_cpu
    )
    for module, name in (("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params"),
                         ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")):
        optimizer = getattr(importlib.import_module(module), name)
        optimizer.__init__ = _sorting_cpu_tensors_as_cuda(optimizer.__init__)
    _APPLIED = True
    logger.info("CUDA not available: megatron-core CPU/gloo redirects applied (%d modules)",
                len(_CUDA_FACTORY_MODULES))
    return True


def is_applied() -> bool:
    return _APPLIED

"""torch's fused AdamW for megatron's optimizer on a GPU without TE/APEX.

Without Transformer Engine or APEX, megatron-core 0.16 builds ``torch.optim.AdamW`` with torch's
defaults, which on a GPU is the multi-tensor (``foreach``) implementation: eight operations, each
a pass over the fp32 master weights, gradients, moments or a temporary (weight decay, lerp, mul,
addcmul, sqrt, div, add, addcdiv), about 20 reads and writes of 4 bytes per parameter. torch's
fused implementation does the whole update in one pass: 7 (read weight, gradient and the two
moments, write weight and moments). For the 2.36 B-parameter benchmark model that is ~190 GB
against ~66 GB of memory traffic per optimizer step; the 2026-12-04 H200 step spent 0.09 s in
optimizer kernels, which 50% MFU leaves little room for (docs/BENCHMARKS.md, "What 50% MFU
leaves"). TE's and APEX's ``FusedAdam``, which megatron takes when either is installed, are the
same kind of kernel.

:func:`use_fused_kernels` sets ``fused`` on every parameter group of megatron's inner torch
optimizers whose parameters are all on a GPU. torch reads the flag at every step, and creates
each parameter's ``step`` counter where its fused kernel wants it: an fp32 tensor on the
parameter's device. The counters that already exist (loaded from a checkpoint, or added by
compat/torch_adam.py on the host) are moved there too, which is why the trainer calls it again
after a load: torch's ``load_state_dict`` also replaces the groups' flags with the saved ones
(a checkpoint saved on a GPU and resumed on the CPU gets torch's default kernel back). On the
CPU the groups keep torch's default kernel (the demo's trajectory depends on its
rounding, as compat/packed_rope.py explains).
"""
from __future__ import annotations

from typing import Iterable, List

import torch


def _on_gpu(params: List[torch.Tensor]) -> bool:
    return bool(params) and all(param.is_cuda for param in params)


def _inner_torch_adams(optimizer) -> Iterable[torch.optim.Adam]:
    """The torch Adam/AdamW instances inside megatron's (possibly chained) optimizer."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, torch.optim.Adam):
            yield torch_optimizer


def use_fused_kernels(optimizer) -> int:
    """Runs the GPU parameter groups of megatron's torch Adam/AdamW as torch's fused kernel and
    moves their existing ``step`` counters to where that kernel reads them (fp32, on the
    parameter's device); hands any other group that a checkpoint brought in fused back to
    torch's default. Returns how many groups run fused: 0 on the CPU, or with TE's or APEX's
    optimizer (not torch's)."""
    fused = 0
    for torch_optimizer in _inner_torch_adams(optimizer):
        for group in torch_optimizer.param_groups:
            if not _on_gpu(group["params"]) or group.get("differentiable"):
                if group.get("fused"):
                    group.update(fused=None, foreach=None)
                continue
            group.update(fused=True, foreach=False)
            fused += 1
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state and "step" in state:
                    state["step"] = state["step"].to(dtype=torch.float32, device=param.device)
    return fused

"""What megatron-core 0.16 needs to run without CUDA (CPU + gloo), and fixes for GPU runs too.

Call :func:`apply_cpu_redirects` once, before building models or optimizers. It is a no-op
when CUDA is available, so entry points can call it unconditionally.

:func:`apply_packed_rope_fast_path` (CPU and GPU) keeps megatron's packed-sequence RoPE from
reading ``cu_seqlens`` on the host in every attention layer (see compat/packed_rope.py).

``compat.checkpoint_writer`` starts megatron's checkpoint-result queue in the background, so the
first save of a run costs what the others do.

The distributed optimizer over torch's Adam (no TE/Apex, CPU or GPU) needs
:func:`apply_torch_adam_fixes` to resume from a checkpoint (see compat/torch_adam.py).

:func:`apply_foreach_multi_tensor` gives megatron's per-tensor optimizer fallbacks (gradient
norm, clipping, master-weight copy; no TE/Apex) torch's multi-tensor kernels on a GPU
(see compat/multi_tensor.py).

:func:`apply_wgrad_accumulation` lets megatron's linears fuse gradient accumulation without
APEX, on torch's fp32-output GEMM (see compat/wgrad_accumulation.py).

:func:`apply_batched_grad_adds` makes megatron's DDP add the small gradients (norms, biases) into
its buffer with one multi-tensor add per backward instead of one add each, bit for bit the same
(see compat/ddp_grad_adds.py).

:func:`apply_selective_recompute_fixes` lets megatron's selective recompute of "layernorm" and
"mlp" run without TE (see compat/selective_recompute.py).

:func:`use_fused_adam` runs megatron's torch AdamW (no TE/APEX) as torch's fused kernel on a GPU
(see compat/fused_adam.py).

:func:`apply_bias_gelu_fusion` compiles the vision MLP's fc1 bias and exact GELU into one kernel
on a GPU (see compat/bias_gelu.py).

``compat.embedding_wgrad.rows_into_main_grad`` adds the token embedding's gradient into its
fp32 buffer row by row under gradient-accumulation fusion, instead of a table-sized gradient
and DDP's add (the model's ``embed`` uses it).

:func:`apply_single_rank_tp_shortcuts` lets megatron's tensor-parallel linears skip their
communication regions' autograd Functions (identities) and a per-call deprecation warning when
the tensor-parallel group has one rank (see compat/tp_regions.py).
"""
from megatron_patch.compat.bias_gelu import apply as apply_bias_gelu_fusion
from megatron_patch.compat.cpu import apply as apply_cpu_redirects, is_applied
from megatron_patch.compat.ddp_grad_adds import apply as apply_batched_grad_adds
from megatron_patch.compat.fused_adam import use_fused_kernels as use_fused_adam
from megatron_patch.compat.multi_tensor import apply as apply_foreach_multi_tensor
from megatron_patch.compat.packed_rope import apply as apply_packed_rope_fast_path
from megatron_patch.compat.selective_recompute import apply as apply_selective_recompute_fixes
from megatron_patch.compat.torch_adam import apply as apply_torch_adam_fixes
from megatron_patch.compat.tp_regions import apply as apply_single_rank_tp_shortcuts
from megatron_patch.compat.wgrad_accumulation import install as apply_wgrad_accumulation

__all__ = ["apply_batched_grad_adds", "apply_bias_gelu_fusion", "apply_cpu_redirects",
           "apply_foreach_multi_tensor", "apply_packed_rope_fast_path",
           "apply_selective_recompute_fixes", "apply_single_rank_tp_shortcuts",
           "apply_torch_adam_fixes",
           "apply_wgrad_accumulation", "is_applied", "use_fused_adam"]

"""What megatron-core 0.16 needs to run without CUDA (CPU + gloo).

Call :func:`apply_cpu_redirects` once, before building models or optimizers. It is a no-op
when CUDA is available, so entry points can call it unconditionally.
"""
from megatron_patch.compat.cpu import apply as apply_cpu_redirects, is_applied

__all__ = ["apply_cpu_redirects", "is_applied"]

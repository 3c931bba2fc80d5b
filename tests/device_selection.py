"""Which device the test session may use: the CPU suite must behave the same on a GPU machine.

Most tests build the tiny model and compare values computed on CPU; on a machine with CUDA the
package would otherwise pick the GPU paths (TE spec, nccl, fused kernels, CUDA RNG), so the
same `pytest` would test something else there, and fail where tensors land on two devices.
`pytest` therefore hides the GPUs (CUDA_VISIBLE_DEVICES="", set before anything touches CUDA,
inherited by the trainer subprocesses) unless the `gpu` tests were asked for: `pytest -m gpu`.
"""
import re

GPU_MARK_SELECTED = re.compile(r"(?<!not )\bgpu\b")


def gpu_tests_selected(markexpr: str) -> bool:
    """True when the `-m` expression asks for the gpu tests ("gpu", "gpu and not slow"), False
    for no expression or one that excludes them ("not gpu", "slow")."""
    return bool(GPU_MARK_SELECTED.search(markexpr or ""))

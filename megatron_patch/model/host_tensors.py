"""Host tensors handed to the device without making the host wait for it.

Two operations make the host wait, every micro-batch, until the device has run everything queued
before them; the device then idles while the host launches the next kernels, a stall that no
kernel profile shows:

* torch's default copy to a GPU (``.to(device)``, not ``non_blocking``) synchronizes the stream
  before it returns;
* selecting rows of a device tensor by a boolean mask there (``x[mask]``) reads the mask's count
  back, the size of the result.

What is known on the host (the loader's segment offsets and loss mask, the images' grid and
patch positions) is therefore computed there and copied from pinned memory, asynchronously.
tests/test_model_host_syncs.py checks a whole micro-batch for both.
"""
import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, the copy queued behind the device's work instead
    of waiting for it."""
    if device.type == "cuda" and not tensor.is_cuda:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def nonzero_on(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The positions where the 1-D host ``mask`` is nonzero, on ``device``."""
    return to_device(mask.nonzero().squeeze(1), device)

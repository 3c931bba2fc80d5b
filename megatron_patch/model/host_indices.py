"""Row indices chosen on the host and handed to the device without a sync.

Selecting rows of a device tensor by a boolean mask there (``x[mask]``) makes the host wait for
the device: the result's size is the mask's count, which the device computes and sends back, so
the host stops launching until everything queued before is done, and the device then idles
while the host launches again. Where the mask is known on the host (the loader's loss mask, the
images' segment offsets), its indices are computed there and copied from pinned memory, a copy
that does not wait for the device either.
"""
import torch


def nonzero_on(device: torch.device, mask: torch.Tensor) -> torch.Tensor:
    """The positions where the 1-D ``mask`` is nonzero, as a tensor on ``device``."""
    rows = mask.nonzero().squeeze(1)
    if device.type == "cuda" and not rows.is_cuda:
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)

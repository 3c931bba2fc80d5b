"""Per-log-interval statistics: accumulated locally every step, reduced over ranks only when a
line is logged (one small all-reduce per --log-interval, not per step).

Data statistics (tokens, samples, images, FLOPs) are counted by the TP0/PP0 rank of each
data-parallel replica -- its peers see the same batches -- and the loss by the last pipeline
stage's TP0 rank, so a world-wide SUM gives global figures.
"""
import resource
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_patch.training.flops import LanguageShape, VisionShape, training_flops
from megatron_patch.training.parallel_setup import all_reduce_host

_FIELDS = ("loss_sum", "loss_tokens", "real_tokens", "capacity", "sequences", "samples", "images",
           "dropped_overlong", "bad_samples", "truncated", "model_flops", "hardware_flops")


def model_shapes(cfg):
    lm, vi = cfg.language, cfg.vision
    language = LanguageShape(lm.num_layers, lm.hidden_size, lm.ffn_hidden_size,
                             lm.num_attention_heads, lm.num_query_groups, lm.head_dim,
                             lm.vocab_size)
    vision = VisionShape(vi.num_layers, vi.hidden_size, vi.ffn_hidden_size, vi.patch_dim,
                         vi.spatial_merge_size, lm.hidden_size)
    return language, vision


def batch_flops(batch, language: LanguageShape, vision: VisionShape, recompute: Optional[str],
                chunked_loss: bool = False,
                recomputed_layers: Optional[Tuple[int, int]] = None):
    """(model, hardware) FLOPs of one micro-batch as the model runs it (padding included);
    ``recompute``: what the backward repeats (kernels.recomputed_flops), full recompute in
    ``recomputed_layers`` (kernels.recomputed_layers); ``chunked_loss``: the output layer ran on
    the loss tokens only (flops.training_flops)."""
    if batch.cu_seqlens is not None:
        segments = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    else:
        segments = [batch.tokens.shape[1]] * batch.tokens.shape[0]
    patches = batch.image_grid_thw.prod(dim=1).tolist() if batch.image_grid_thw.numel() else []
    loss_tokens = int(batch.loss_mask.count_nonzero()) if chunked_loss else None
    return training_flops(language, segments, vision, patches, recompute, loss_tokens,
                          recomputed_layers)


@dataclass
class IntervalStats:
    counts: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(_FIELDS, 0.0))
    iterations: int = 0
    skipped: int = 0
    last_grad_norm: Optional[float] = None

    def add_batch(self, batch, flops) -> None:
        """`batch` is an SFTMicroBatch, which carries its own statistics."""
        c = self.counts
        c["real_tokens"] += batch.real_tokens
        c["capacity"] += batch.capacity
        c["sequences"] += batch.tokens.shape[0]
        c["samples"] += batch.num_samples
        c["images"] += batch.num_images
        c["dropped_overlong"] += batch.dropped_overlong
        c["bad_samples"] += batch.bad_samples
        c["truncated"] += batch.truncated
        c["model_flops"] += flops[0]
        c["hardware_flops"] += flops[1]

    def add_loss(self, loss_pair: torch.Tensor) -> None:
        self.counts["loss_sum"] += float(loss_pair[0])
        self.counts["loss_tokens"] += float(loss_pair[1])

    def reduce(self) -> Dict[str, float]:
        """Global sums (every rank gets them) plus the peak memory over ranks, in GiB."""
        vector = all_reduce_host(
            torch.tensor([self.counts[name] for name in _FIELDS], dtype=torch.float64))
        memory = all_reduce_host(torch.tensor([peak_memory_gib()], dtype=torch.float64),
                                 op=dist.ReduceOp.MAX)
        totals = dict(zip(_FIELDS, vector.tolist()))
        totals["peak_memory_gib"] = float(memory)
        return totals


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def interval_metrics(totals: Dict[str, float], seconds: float, world_size: int,
                     peak_flops: Optional[float], phases: Dict[str, float]) -> Dict[str, float]:
    """TensorBoard scalars for one interval (lr, grad norm and counters are added by the loop)."""
    seconds = max(seconds, 1e-9)
    tokens_per_sec = totals["real_tokens"] / seconds
    metrics = {
        "train/loss": totals["loss_sum"] / max(totals["loss_tokens"], 1.0),
        "throughput/tokens_per_sec": tokens_per_sec,
        "throughput/tokens_per_sec_per_device": tokens_per_sec / world_size,
        "throughput/samples_per_sec": totals["samples"] / seconds,
        "throughput/samples_per_sec_per_device": totals["samples"] / seconds / world_size,
        "data/packing_efficiency": totals["real_tokens"] / max(totals["capacity"], 1.0),
        "data/samples_per_sequence": totals["samples"] / max(totals["sequences"], 1.0),
        "data/images_per_sequence": totals["images"] / max(totals["sequences"], 1.0),
        "memory/peak_gib": totals["peak_memory_gib"],
        "throughput/model_tflops_per_device": totals["model_flops"] / seconds / world_size / 1e12,
    }
    if peak_flops:
        metrics["throughput/mfu"] = totals["model_flops"] / seconds / world_size / peak_flops
        metrics["throughput/hfu"] = totals["hardware_flops"] / seconds / world_size / peak_flops
    for phase, spent in phases.items():
        metrics[f"time/{phase}_sec"] = spent
    return metrics

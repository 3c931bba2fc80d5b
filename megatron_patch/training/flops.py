"""Model FLOPs for MFU/HFU, counting the vision tower, the adapter and the language model.

Per token, a dense matmul of [in x out] costs 2*in*out FLOPs forward; training costs 3x forward
(backward is twice forward). Attention scores add 2*2*ctx*width per token (QK^T and AV), with
ctx the tokens attended to: causal text attends to (n+1)/2 tokens on average in a sequence
(segment) of n; each image's patches attend to the whole image (+ its class token).
MFU counts 3x forward of every token, whatever the implementation skips or repeats. HFU counts
what the hardware executes:

* the patch embedding's backward is its weight gradient only (pixels take no gradient);
* full recompute repeats the decoder layers' forward, in both towers (not the patch
  embedding, the adapter or the output layer, which run outside the recomputed layers).
  torch.utils.checkpoint's non-reentrant recompute (the baseline's, per layer:
  ``"full_early_stop"``) stops once it has every tensor the backward saved, so each layer's
  last matmul, the MLP's output projection, does not run again;
* selective recompute of the MLP repeats the MLPs' forward (both towers; the norms' and core
  attention's recompute are left out: no matmuls, or small);
* the chunked loss (model/output_loss.py) runs the output layer on the loss tokens only (3x
  their logits FLOPs instead of 3x every token's).

tests/test_training_flops.py checks these counts, attention included, against torch's FLOP
counter run over a training micro-batch of the model itself (and of the baseline trainer's).
Peak numbers are dense bf16 tensor-core figures (no sparsity).
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

PEAK_BF16_TFLOPS = {  # by a substring of torch.cuda.get_device_name()
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
    "H20": 148.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
}


@dataclass(frozen=True)
class LanguageShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool = True


@dataclass(frozen=True)
class VisionShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    patch_dim: int            # 3 * temporal * patch * patch
    merge_size: int = 2
    out_hidden_size: int = 0  # adapter output width (the language hidden size)
    class_token: bool = True


def language_forward_flops(shape: LanguageShape, segment_lengths: Sequence[int]) -> float:
    """The decoder layers and the output layer over every token, forward."""
    return (shape.num_layers * language_layer_flops(shape, segment_lengths)
            + logits_flops(shape, sum(segment_lengths)))


def language_layer_flops(shape: LanguageShape, segment_lengths: Sequence[int]) -> float:
    """One decoder layer's forward: its linears and its causal attention within each segment."""
    q_width = shape.num_attention_heads * shape.head_dim
    kv_width = shape.num_query_groups * shape.head_dim
    per_token_linear = 2 * shape.hidden_size * (q_width + 2 * kv_width) + 2 * q_width * shape.hidden_size
    per_token_linear += language_mlp_flops_per_token(shape)
    return (sum(segment_lengths) * per_token_linear
            + attention_forward_flops(segment_lengths, q_width, causal=True))


def attention_forward_flops(segment_lengths: Sequence[int], width: int, causal: bool) -> float:
    """One attention layer's scores and weighted sums over these segments, forward: 2 * 2 *
    width FLOPs per (query, key) pair; ``width`` is heads x head_dim of the queries."""
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in segment_lengths)
    return 4 * pairs * width


def language_attention_flops(shape: LanguageShape, segment_lengths: Sequence[int]) -> float:
    """Every layer's causal attention scores and weighted sums, forward."""
    return shape.num_layers * attention_forward_flops(
        segment_lengths, shape.num_attention_heads * shape.head_dim, causal=True)


def language_mlp_flops_per_token(shape: LanguageShape) -> float:
    return (3 if shape.gated_mlp else 2) * 2 * shape.hidden_size * shape.ffn_hidden_size


def image_token_counts(shape: VisionShape, image_patch_counts: Sequence[int]) -> list:
    """The tokens each image runs through the tower's layers: its patches and its class token."""
    extra = 1 if shape.class_token else 0
    return [patches + extra for patches in image_patch_counts]


def _in_every_layer(language: LanguageShape, segment_lengths: Sequence[int],
                    vision: Optional[VisionShape], image_patch_counts: Sequence[int],
                    per_language_token: float, per_vision_token: float) -> float:
    """A per-token cost of one layer, over every token of every layer of both towers."""
    total = language.num_layers * sum(segment_lengths) * per_language_token
    if vision is not None:
        total += (vision.num_layers * sum(image_token_counts(vision, image_patch_counts))
                  * per_vision_token)
    return total


def mlp_forward_flops(language: LanguageShape, segment_lengths: Sequence[int],
                      vision: Optional[VisionShape] = None,
                      image_patch_counts: Sequence[int] = ()) -> float:
    """Every layer's MLP forward (both towers): what selective recompute of "mlp" repeats."""
    return _in_every_layer(
        language, segment_lengths, vision, image_patch_counts,
        language_mlp_flops_per_token(language),
        vision_mlp_flops_per_patch(vision) if vision is not None else 0.0)


def mlp_output_flops(language: LanguageShape, segment_lengths: Sequence[int],
                     vision: Optional[VisionShape] = None,
                     image_patch_counts: Sequence[int] = ()) -> float:
    """Every layer's MLP output projection (ffn -> hidden) forward, both towers: what an early
    stopping recompute leaves out."""
    return _in_every_layer(
        language, segment_lengths, vision, image_patch_counts,
        2 * language.ffn_hidden_size * language.hidden_size,
        2 * vision.ffn_hidden_size * vision.hidden_size if vision is not None else 0.0)


def vision_mlp_flops_per_patch(shape: VisionShape) -> float:
    return 2 * 2 * shape.hidden_size * shape.ffn_hidden_size


def logits_flops(shape: LanguageShape, tokens: int) -> float:
    """The output layer's forward over ``tokens`` tokens."""
    return 2 * tokens * shape.hidden_size * shape.vocab_size


def vision_forward_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """The patch embedding, the decoder layers and the adapter, forward."""
    return (patch_embedding_flops(shape, image_patch_counts)
            + vision_layers_flops(shape, image_patch_counts)
            + adapter_flops(shape, image_patch_counts))


def patch_embedding_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """Each patch's pixels to the tower's width, forward."""
    return sum(2 * patches * shape.patch_dim * shape.hidden_size for patches in image_patch_counts)


def vision_layers_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """Every decoder layer of the tower, forward."""
    return shape.num_layers * vision_layer_flops(shape, image_patch_counts)


def vision_layer_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """One decoder layer of the tower, forward: its linears over the patches and the class
    token, and its attention within each image."""
    h = shape.hidden_size
    per_token = 2 * h * 3 * h + 2 * h * h + vision_mlp_flops_per_patch(shape)
    lengths = image_token_counts(shape, image_patch_counts)
    return sum(lengths) * per_token + attention_forward_flops(lengths, h, causal=False)


def adapter_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """The adapter's two linears over the merged patches (merge x merge -> 1), forward."""
    wide = shape.hidden_size * shape.merge_size ** 2
    merged = sum(patches // (shape.merge_size ** 2) for patches in image_patch_counts)
    return 2 * merged * (wide * wide + wide * shape.out_hidden_size)


def vision_attention_flops(shape: VisionShape, image_patch_counts: Sequence[int]) -> float:
    """Every layer's attention within each image (class token included), forward."""
    return shape.num_layers * attention_forward_flops(
        image_token_counts(shape, image_patch_counts), shape.hidden_size, causal=False)


def training_flops(language: LanguageShape, segment_lengths: Sequence[int],
                   vision: Optional[VisionShape] = None, image_patch_counts: Sequence[int] = (),
                   recompute: Optional[str] = None, loss_tokens: Optional[int] = None,
                   recomputed_layers: Optional[Tuple[int, int]] = None) -> tuple:
    """(model FLOPs, hardware FLOPs) of one training step over these sequences and images.
    ``recompute``: "full", "full_early_stop" (full through torch.utils.checkpoint's
    non-reentrant recompute), "mlp" (selective, with the MLP among its modules) or None;
    ``recomputed_layers``: (language, vision) layers that full recompute repeats, None for all
    (megatron's block method repeats only some: kernels.recomputed_layers);
    ``loss_tokens``: the chunked loss's token count, None for megatron's full logits."""
    with_images = vision is not None and bool(image_patch_counts)
    language_layer = language_layer_flops(language, segment_lengths)
    vision_layer = vision_layer_flops(vision, image_patch_counts) if with_images else 0.0
    all_logits = logits_flops(language, sum(segment_lengths))
    forward = language.num_layers * language_layer + all_logits
    pixels_in = 0.0  # the patch embedding's FLOPs: its input takes no gradient
    if with_images:
        forward += vision_forward_flops(vision, image_patch_counts)
        pixels_in = patch_embedding_flops(vision, image_patch_counts)
    hardware = 3 * forward - pixels_in
    if recompute in ("full", "full_early_stop"):  # the layers only, not what runs around them
        language_layers, vision_layers = recomputed_layers or (
            language.num_layers, vision.num_layers if vision is not None else 0)
        hardware += language_layers * language_layer + vision_layers * vision_layer
    if recompute == "full_early_stop":
        hardware -= mlp_output_flops(language, segment_lengths, vision, image_patch_counts)
    elif recompute == "mlp":
        hardware += mlp_forward_flops(language, segment_lengths, vision, image_patch_counts)
    if loss_tokens is not None:
        hardware += 3 * (logits_flops(language, loss_tokens) - all_logits)
    return 3 * forward, hardware


def peak_flops_per_device(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak in FLOP/s for a CUDA device name, None when unknown (or CPU)."""
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None

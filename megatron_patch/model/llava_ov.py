"""LLaVA-OneVision-1.5 on megatron-core: vision tower + adapter + Qwen3 decoder.

Pipeline layout: the vision tower and the adapter live on the *first* pipeline stage together
with the token embedding, where the image features replace the ``<|image_pad|>`` embeddings. The
language decoder layers are split over the stages by megatron (even split, or uneven first/last
stage counts from ``num_layers_in_{first,last}_pipeline_stage`` -- giving the first stage fewer
LLM layers balances the vision work); the last stage holds the final norm and output layer.
Only the ``[s, b, hidden]`` activations cross stage boundaries.

Forward inputs (per micro-batch), matching the HF model and the data encoder:

* ``input_ids`` ``[b, s]``; ``position_ids`` ``[b, s]`` (reset to 0 at every packed sample);
  both are needed on *every* stage (RoPE is computed from ``position_ids`` on each stage).
* ``pixel_values`` ``[n_patches, 3*14*14]``: all images of the micro-batch, in the order their
  ``<|image_pad|>`` runs appear in ``input_ids`` (row-major over ``[b, s]``);
  ``image_grid_thw`` ``[n_images, 3]``. ``None`` for text-only micro-batches. First stage only.
* ``labels`` ``[b, s]`` (already shifted: label of position i is token i+1) -> per-token loss
  ``[b, s]`` (megatron convention; masking/averaging with ``loss_mask`` is the trainer's job).
  Without labels the last stage returns full-vocab logits ``[b, s, vocab]``.
* ``loss_mask`` ``[b, s]``, optional: with the chunked loss (``loss_chunk_tokens``), positions
  where it is 0 are not computed (loss 0, no gradient; model/language.py).
* ``packed_seq_params``: ``PackedSeqParams(qkv_format='thd', cu_seqlens_q/kv=...)`` for packed
  samples (``b == 1``); attention stays inside each segment. ``cu_seqlens[-1]`` must equal ``s``
  (put trailing padding in a segment of its own). With the language layers as CUDA graphs
  (``graph_segments``) every micro-batch's segments are padded to that fixed count.

Sequence parallelism (language config ``sequence_parallel``; needs ``s`` divisible by the TP
size): each TP rank keeps ``s / TP`` tokens of the hidden states between the tensor-parallel
linears, so norms, residuals and the activations recompute keeps shrink by the TP size. The
first stage embeds and merges the image features over the whole sequence, then scatters;
stage boundaries carry ``[s / TP, b, hidden]``.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.compat.embedding_wgrad import rows_into_main_grad
from megatron_patch.model.adapter import VisionAdapter
from megatron_patch.model.attention import with_fixed_segments
from megatron_patch.model.configs import LlavaOVConfig
from megatron_patch.model.language import build_language_model, rope_position_ids
from megatron_patch.model.vision import RiceVisionModel


class LlavaOVModel(MegatronModule):
    def __init__(self, cfg: LlavaOVConfig, vision_config: TransformerConfig,
                 language_config: TransformerConfig, vision_spec: ModuleSpec,
                 language_spec: TransformerBlockSubmodules, pre_process: bool = True,
                 post_process: bool = True,
                 vp_stage: Optional[int] = None, loss_chunk_tokens: int = 0,
                 graph_segments: Optional[int] = None):
        super().__init__(config=language_config)
        self.cfg = cfg
        self.graph_segments = graph_segments
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = cfg.image_token_id
        if pre_process:
            self.vision_model = RiceVisionModel(vision_config, cfg.vision, vision_spec)
            self.adapter = VisionAdapter(vision_config, cfg.vision.hidden_size,
                                         cfg.language.hidden_size, cfg.vision.spatial_merge_size,
                                         cfg.vision.layernorm_eps)
        else:
            self.vision_model = self.adapter = None
        self.language_model = build_language_model(cfg.language, language_config, language_spec,
                                                   pre_process, post_process, vp_stage=vp_stage,
                                                   loss_chunk_tokens=loss_chunk_tokens)
        # megatron's schedules/DDP look these up on the wrapped model
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive the previous stage's hidden states here."""
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``[n_image_tokens, hidden]`` in token order (4 patches -> 1 token)."""
        return self.adapter(self.vision_model(pixel_values, image_grid_thw))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with image features at the ``<|image_pad|>`` positions: ``[s, b, h]``.

        No device sync: the number of image tokens comes from ``image_grid_thw`` (on the host,
        as the trainer passes it), their positions from a fixed-size ``nonzero``. Counting them
        on the device and reading the count back would make the host wait, every micro-batch,
        for everything queued before, and leave the GPU idle while the host then launches the
        vision tower. So on a GPU a count that disagrees with the images stops the run with a
        device-side assertion; on the CPU, where reading it costs nothing, with a message.
        Under gradient-accumulation fusion the token embedding's gradient goes into its fp32
        buffer row by row (compat/embedding_wgrad.py)."""
        embedding = self.language_model.embedding
        with rows_into_main_grad(embedding.word_embeddings.weight,
                                 self.language_model.config.gradient_accumulation_fusion):
            emb = embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_image = (input_ids == self.image_token_id).reshape(-1)  # [b * s], row-major
        has_pixels = pixel_values is not None and pixel_values.numel() > 0
        merged = self.cfg.vision.spatial_merge_size ** 2
        slots = int(image_grid_thw.prod(dim=-1).sum()) // merged if has_pixels else 0
        self._check_image_tokens(is_image, slots)
        if not has_pixels:
            return self._with_idle_vision_gradients(emb)
        feats = self.image_features(pixel_values, image_grid_thw)
        if feats.shape[0] != slots:
            raise ValueError(f"image features ({feats.shape[0]}) != the images' {slots} tokens")
        positions = torch.nonzero_static(is_image, size=slots).squeeze(1)
        hidden = emb.shape[-1]
        # [b * s, h] in row-major [b, s] order: the order of HF's masked_scatter
        flat = emb.transpose(0, 1).reshape(-1, hidden).clone()
        flat[positions] = feats.to(flat.dtype)
        return flat.view(emb.shape[1], emb.shape[0], hidden).transpose(0, 1).contiguous()

    def _with_idle_vision_gradients(self, emb: torch.Tensor) -> torch.Tensor:
        """A micro-batch without images still gives every trainable vision and adapter
        parameter a gradient (zeros): megatron's DDP with --overlap-grad-reduce launches each
        bucket's reduction when all its parameters' gradients are in, and fails the step when
        some never arrive (text-only samples are common in SFT mixes). The smallest image
        (one merged token) goes through the tower; its features are tied to the embeddings with
        a zero gradient and never touch their values. Without gradients (evaluation) or with a
        frozen tower, nothing is run."""
        vision_parameters = [*self.vision_model.parameters(), *self.adapter.parameters()]
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in vision_parameters):
            return emb
        vision = self.cfg.vision
        side = vision.spatial_merge_size
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.zeros(side * side, patch, dtype=vision_parameters[0].dtype,
                             device=emb.device)
        grid = torch.tensor([[1, side, side]], dtype=torch.long)
        return _ZeroGradientTie.apply(emb, self.image_features(pixels, grid))

    @staticmethod
    def _check_image_tokens(is_image: torch.Tensor, slots: int) -> None:
        """As many ``<|image_pad|>`` tokens as the images give (see :meth:`embed`)."""
        if is_image.device.type != "cpu":
            torch._assert_async(is_image.sum() == slots)
            return
        found = int(is_image.sum())
        if found != slots:
            raise ValueError(f"{found} <|image_pad|> tokens, but the images (image_grid_thw) "
                             f"give {slots}")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
            if self.config.sequence_parallel:
                # clone: the slice is a view that would keep the whole sequence alive
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(
                    decoder_input).clone()
        if packed_seq_params is not None and self.graph_segments:
            packed_seq_params = with_fixed_segments(packed_seq_params, self.graph_segments,
                                                    input_ids.shape[1])
        return self.language_model(
            input_ids=input_ids,
            position_ids=rope_position_ids(position_ids),
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=True if labels is None else None,
        )


class _ZeroGradientTie(torch.autograd.Function):
    """``values`` unchanged; ``tied`` gets a zero gradient, so everything that computed it takes
    part in the backward pass without changing any value or other gradient (unlike adding
    ``0 * tied.sum()``, which a non-finite feature would turn into NaN)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
        ctx.tied_shape, ctx.tied_dtype = tied.shape, tied.dtype
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.tied_shape, dtype=ctx.tied_dtype)

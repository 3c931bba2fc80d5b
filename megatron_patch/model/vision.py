"""RICE-ViT vision encoder on a megatron-core ``TransformerBlock``.

Input is the Qwen2-VL-style flat patch tensor of *all* images of a batch: ``pixel_values``
``[n_patches, C*T*P*P]`` with ``grid_thw`` ``[n_images, 3]`` (t, h, w in patches). Within an
image the patches come grouped by 2x2 merge window (the data encoder and HF processor write them
that way), so the adapter can merge 4 consecutive rows.

Per image: Conv2d patch embedding (no bias) -> a learned class token prepended -> ``pre_layernorm``
-> ``num_layers`` pre-LN blocks whose attention is bidirectional *within the image only* ->
class tokens dropped. Attention uses a 2D rotary embedding: of each head's ``d`` channels, the
first quarter of the rotary frequencies encode the patch row, the second the column
(``d/2`` angles, duplicated to ``d`` in rotate-half layout, theta 1e4); the class token's angles
are a learned parameter (``class_pos_emb``). Images are packed as ``thd`` segments
(``PackedSeqParams``), so the same block runs on TE/flash (varlen) and on the SDPA fallback, and
megatron applies our per-token angles exactly (its "freqs cover every token" path).

Parameter names (HF ``visual.*`` in brackets)::

    patch_embed.proj.weight                 [visual.patch_embed.proj.weight]
    class_embedding, class_pos_emb          [visual.class_embedding, visual.class_pos_emb]
    pre_layernorm.{weight,bias}             [visual.pre_layernorm.*]
    decoder.layers.N.input_layernorm.*      [visual.blocks.N.norm1.*]   (TE: ...linear_qkv.layer_norm_*)
    decoder.layers.N.self_attention.linear_qkv.*   [visual.blocks.N.attn.qkv.*]  rows regrouped per head
    decoder.layers.N.self_attention.linear_proj.*  [visual.blocks.N.attn.proj.*]
    decoder.layers.N.pre_mlp_layernorm.*    [visual.blocks.N.norm2.*]   (TE: mlp.linear_fc1.layer_norm_*)
    decoder.layers.N.mlp.linear_fc1.*       [visual.blocks.N.mlp.fc1.*]
    decoder.layers.N.mlp.linear_fc2.*       [visual.blocks.N.mlp.fc2.*]
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.compat import tp_regions
from megatron_patch.model.attention import covering_packed_seq_params
from megatron_patch.model.configs import VisionConfig
from megatron_patch.model.host_tensors import nonzero_on, to_device


def patch_rows(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The rows of the images' patches in the tower's output, each image's class token (the
    first row of its segment) left out: from the host's segment offsets, without a device
    sync (model/host_tensors.py)."""
    keep = torch.ones(int(cu_seqlens[-1]), dtype=torch.bool)
    keep[cu_seqlens[:-1].long()] = False
    return nonzero_on(keep, device)


class PatchEmbed(nn.Module):
    """14x14 non-overlapping Conv2d over each flattened patch (== a linear map, kept as Conv2d so
    the weight has HF's shape ``[hidden, C, P, P]``)."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.in_channels, self.patch_size = vcfg.in_channels, vcfg.patch_size
        self.proj = nn.Conv2d(vcfg.in_channels, vcfg.hidden_size, kernel_size=vcfg.patch_size,
                              stride=vcfg.patch_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.reshape(-1, self.in_channels, self.patch_size, self.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).flatten(1)


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the merge-window-grouped order of ``pixel_values``."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> window-major order [h/m, w/m, m, m]
        pos = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], -1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


class RiceVisionModel(MegatronModule):
    """Vision tower. ``forward(pixel_values, grid_thw) -> [n_patches, hidden]`` (class tokens
    removed, patch order unchanged)."""

    def __init__(self, config: TransformerConfig, vcfg: VisionConfig, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.vcfg = vcfg
        head_dim = vcfg.head_dim
        self.patch_embed = PatchEmbed(vcfg)
        self.class_embedding = nn.Parameter(vcfg.hidden_size ** -0.5 * torch.randn(vcfg.hidden_size))
        self.class_pos_emb = nn.Parameter(torch.randn(1, head_dim // 2))
        self.pre_layernorm = nn.LayerNorm(vcfg.hidden_size, eps=vcfg.layernorm_eps)
        self.decoder = TransformerBlock(config=config, spec=layer_spec, pre_process=True,
                                        post_process=False, post_layer_norm=False)

    def set_input_tensor(self, input_tensor) -> None:
        """The vision tower always starts from pixels on the first pipeline stage."""

    def _rotary_angles(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        # computed here in fp32 rather than kept as a buffer: model.to(bf16) would round a buffer
        rot = self.vcfg.head_dim // 2  # rows use rot/2 frequencies, columns the other rot/2
        inv = 1.0 / (self.vcfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32,
                                                           device=device) / rot))
        pos = to_device(patch_positions(grid_thw, self.vcfg.spatial_merge_size), device)
        return torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], dim=-1)  # [n_patches, head_dim/2]

    def _with_class_tokens(self, x, angles, lengths: List[int]) -> Tuple[torch.Tensor, ...]:
        """Prepend the class token (and its learned angles) to every image's patches."""
        cls = self.class_embedding.to(x.dtype).unsqueeze(0)
        # each TP rank rotates only its own heads by these angles, so their gradient must be
        # summed over the TP ranks (identity forward, all-reduce backward), as a TP=1 run has it
        cls_ang = tp_regions.copy_to_tensor_model_parallel_region(self.class_pos_emb).float()
        xs, angs = [], []
        for xi, ai in zip(x.split(lengths), angles.split(lengths)):
            xs += [cls, xi]
            angs += [cls_ang, ai]
        seqlens = torch.tensor([n + 1 for n in lengths], dtype=torch.int32)
        cu = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        return torch.cat(xs), torch.cat(angs), cu, int(seqlens.max())

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.to("cpu", torch.long)
        lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, grid_thw says {sum(lengths)}")
        x = self.patch_embed(pixel_values)
        angles = self._rotary_angles(grid_thw, x.device)
        x, angles, cu, max_len = self._with_class_tokens(x, angles, lengths)
        x = self.pre_layernorm(x)
        params = covering_packed_seq_params(cu, x.shape[0], max_len, x.device)
        freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [t, 1, 1, head_dim]
        h = self.decoder(hidden_states=x.unsqueeze(1), attention_mask=None,
                         rotary_pos_emb=freqs, packed_seq_params=params)
        return h.squeeze(1).index_select(0, patch_rows(cu, h.device))

"""The "usual alternative" trainer: LLaVA-OneVision-1.5 in plain PyTorch, transformers style.

What a team writes without Megatron: an eager ``nn.Module`` with HF-style names and maths, torch
``scaled_dot_product_attention``, ``torch.optim.AdamW`` (fused on CUDA), fp32 weights with bf16
autocast, ``clip_grad_norm_``, optional per-layer activation checkpointing
(``gradient_checkpointing``). Kept out of the package: it exists only to be measured against
(``tools/benchmark_throughput.py --trainer both``).

Architecture, same shapes and parameter count as ``megatron_patch.model`` for a config, with the
released checkpoints' HF parameter names (``visual.*``, ``model.*``, ``lm_head``;
:func:`load_hf_state_dict`), so it computes the same function given the same weights:

* vision (RICE-ViT): patch embedding (a bias-free linear over each flattened 3x14x14 patch, the
  same map as the Conv2d), a learned class token per image with learned rotary angles,
  ``pre_layernorm``, pre-LN blocks (fused ``qkv`` with bias, 2D RoPE over patch rows/columns,
  bidirectional attention inside each image, GELU MLP), class tokens dropped;
* merger: LayerNorm per patch, 2x2 windows concatenated, Linear-GELU-Linear to the text width;
* language (Qwen3): RMSNorm, GQA with q/k RMSNorm and HF ``repeat_kv``, 1D RoPE from
  ``position_ids``, SwiGLU, final norm, untied ``lm_head``.

Packed sequences (``cu_seqlens``) are handled by running SDPA segment by segment (causal inside
each segment), so no token attends across samples and no quadratic mask is built; images run the
same way in the vision tower. Loss: sum of per-token cross entropy over assistant tokens divided
by the assistant tokens of the whole global batch (the megatron trainer's definition).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------- shared pieces
class RMSNorm(nn.Module):
    """HF Qwen3RMSNorm: computed in fp32, weight applied in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


def segment_attention(q, k, v, bounds: Sequence[int], causal: bool) -> torch.Tensor:
    """q/k/v ``[heads, t, d]`` (k/v already repeated for GQA); attention inside each
    ``[bounds[i], bounds[i+1])`` segment. Returns ``[heads, t, d]``."""
    if len(bounds) == 2:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal)[0]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out.append(F.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end],
                is_causal=causal)[0])
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------- vision tower
def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of each patch in the 2x2-window-grouped order of ``pixel_values``."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        order = lambda g: g.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1)  # noqa: E731
        out.append(torch.stack([order(rows), order(cols)], dim=-1).repeat(t, 1))
    return torch.cat(out)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x, cos, sin, bounds: List[int]):
        n = x.shape[0]
        q, k, v = self.attn.qkv(self.norm1(x)).view(n, 3, self.heads, -1).unbind(1)  # [n, heads, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bounds,
                              causal=False)
        x = x + self.attn.proj(o.transpose(0, 1).reshape(n, -1))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class BaselineVision(nn.Module):
    """RICE-ViT + merger. ``forward(pixel_values, grid_thw) -> [n_patches / 4, text_hidden]``."""

    def __init__(self, cfg):
        super().__init__()
        v = cfg.vision
        self.v, self.heads = v, v.num_attention_heads
        dim, head_dim = v.hidden_size, v.hidden_size // v.num_attention_heads
        self.patch_embed = nn.Module()  # HF: a Conv2d [dim, 3, 14, 14]; here its [dim, 588] view
        self.patch_embed.proj = nn.Linear(v.patch_dim, dim, bias=False)
        self.class_embedding = nn.Parameter(dim ** -0.5 * torch.randn(dim))
        self.class_pos_emb = nn.Parameter(torch.randn(1, head_dim // 2))
        self.pre_layernorm = nn.LayerNorm(dim, eps=v.layernorm_eps)
        self.blocks = nn.ModuleList(VisionBlock(dim, v.num_attention_heads, v.ffn_hidden_size,
                                                v.layernorm_eps) for _ in range(v.num_layers))
        merged = dim * v.spatial_merge_size ** 2
        self.merger = nn.Module()
        self.merger.ln_q = nn.LayerNorm(dim, eps=v.layernorm_eps)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(),
                                        nn.Linear(merged, cfg.language.hidden_size))
        self.gradient_checkpointing = False

    def _angles(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        rot = (self.v.hidden_size // self.heads) // 2
        inv = 1.0 / (self.v.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        pos = patch_positions(grid_thw, self.v.spatial_merge_size).float()
        return torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], dim=-1).to(device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.cpu()
        lengths = grid_thw.prod(dim=1).tolist()
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype))
        angles = self._angles(grid_thw, x.device)
        xs, angs, bounds = [], [], [0]
        for xi, ai in zip(x.split(lengths), angles.split(lengths)):  # class token per image
            xs += [self.class_embedding.to(x.dtype)[None], xi]
            angs += [self.class_pos_emb.float(), ai]
            bounds.append(bounds[-1] + xi.shape[0] + 1)
        x = self.pre_layernorm(torch.cat(xs))
        emb = torch.cat(angs)
        emb = torch.cat([emb, emb], dim=-1)[:, None, :]  # [n, 1, head_dim]: broadcast over heads
        cos, sin = emb.cos(), emb.sin()
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, bounds, use_reentrant=False)
            else:
                x = block(x, cos, sin, bounds)
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        keep[torch.tensor(bounds[:-1], device=x.device)] = False  # drop class tokens
        x = self.merger.ln_q(x[keep])
        return self.merger.mlp(x.reshape(-1, x.shape[-1] * self.v.spatial_merge_size ** 2))


# ---------------------------------------------------------------------- language model
class DecoderLayer(nn.Module):
    def __init__(self, lm):
        super().__init__()
        h, d = lm.hidden_size, lm.head_dim
        self.heads, self.kv_heads, self.head_dim = lm.num_attention_heads, lm.num_query_groups, d
        self.input_layernorm = RMSNorm(h, lm.rms_norm_eps)
        attn = self.self_attn = nn.Module()
        attn.q_proj = nn.Linear(h, self.heads * d, bias=False)
        attn.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        attn.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        attn.o_proj = nn.Linear(self.heads * d, h, bias=False)
        attn.q_norm, attn.k_norm = RMSNorm(d, lm.rms_norm_eps), RMSNorm(d, lm.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, lm.rms_norm_eps)
        mlp = self.mlp = nn.Module()
        mlp.gate_proj = nn.Linear(h, lm.ffn_hidden_size, bias=False)
        mlp.up_proj = nn.Linear(h, lm.ffn_hidden_size, bias=False)
        mlp.down_proj = nn.Linear(lm.ffn_hidden_size, h, bias=False)

    def forward(self, x, cos, sin, bounds: Optional[List[int]]):
        b, s, _ = x.shape
        attn, mlp = self.self_attn, self.mlp
        y = self.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(y).view(b, s, self.heads, -1)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(y).view(b, s, self.kv_heads, -1)).transpose(1, 2)
        v = attn.v_proj(y).view(b, s, self.kv_heads, -1).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = self.heads // self.kv_heads  # HF repeat_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if bounds is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # packed: b == 1, causal inside each segment
            o = segment_attention(q[0], k[0], v[0], bounds, causal=True)[None]
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        y = self.post_attention_layernorm(x)
        return x + mlp.down_proj(F.silu(mlp.gate_proj(y)) * mlp.up_proj(y))


class BaselineLlava(nn.Module):
    """``forward(batch) -> per-token loss [b, s]`` for an SFT micro-batch (duck-typed: tokens,
    labels, position_ids, pixel_values, image_grid_thw, cu_seqlens)."""

    def __init__(self, cfg, init_std: Optional[float] = None):
        super().__init__()
        lm = cfg.language
        self.cfg, self.image_token_id = cfg, cfg.image_token_id
        self.visual = BaselineVision(cfg)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(lm) for _ in range(lm.num_layers))
        self.model.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        self.lm_head = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # the megatron model's init scale by default, so fresh models start alike
        self._init_weights(cfg.init_method_std if init_std is None else init_std)

    def _init_weights(self, std: float) -> None:
        """HF's _init_weights: normal(0, std) for linears and embeddings, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = self.visual.gradient_checkpointing = enabled

    def _rope(self, position_ids: torch.Tensor):
        lm = self.cfg.language
        inv = 1.0 / (lm.rope_theta ** (torch.arange(0, lm.head_dim, 2, dtype=torch.float32,
                                                    device=position_ids.device) / lm.head_dim))
        freqs = position_ids.float()[..., None] * inv  # [b, s, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, s, d]
        return emb.cos(), emb.sin()

    def forward(self, tokens, labels, position_ids, pixel_values=None, image_grid_thw=None,
                cu_seqlens=None) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        if pixel_values is not None and pixel_values.numel():
            feats = self.visual(pixel_values, image_grid_thw)
            x = x.masked_scatter((tokens == self.image_token_id)[..., None], feats.to(x.dtype))
        cos, sin = self._rope(position_ids)
        bounds = None
        if cu_seqlens is not None:
            if tokens.shape[0] != 1:
                raise ValueError("packed micro-batches must hold one row")
            bounds = [int(b) for b in cu_seqlens.tolist()]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, bounds, use_reentrant=False)
            else:
                x = layer(x, cos, sin, bounds)
        logits = self.lm_head(self.model.norm(x)).float()  # HF upcasts the logits for the loss
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1),
                               reduction="none")
        return loss.view(labels.shape)


def load_hf_state_dict(model: "BaselineLlava", state: dict) -> None:
    """Loads a HF-named state dict (released-checkpoint layout ``visual.*``, ``model.*``,
    ``lm_head.*``): the names are the baseline's own; only the Conv2d patch embedding is viewed
    as the equivalent linear map."""
    state = dict(state)
    key = "visual.patch_embed.proj.weight"
    if key in state and state[key].dim() == 4:
        state[key] = state[key].reshape(state[key].shape[0], -1)
    model.load_state_dict(state, strict=True)


def count_parameters(model: nn.Module) -> dict:
    counts = {"vision": 0, "adapter": 0, "language": 0}
    for name, p in model.named_parameters():
        if name.startswith("visual.merger."):
            counts["adapter"] += p.numel()
        elif name.startswith("visual."):
            counts["vision"] += p.numel()
        else:
            counts["language"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------- trainer
class BaselineTrainer:
    """Model + AdamW; ``step(micro_batches)`` is one optimizer step over a global batch."""

    name = "baseline"

    def __init__(self, cfg, device: torch.device, bf16: bool = False, lr: float = 1e-5,
                 betas=(0.9, 0.99), eps: float = 1e-5, weight_decay: float = 0.0,
                 clip_grad: float = 1.0, recompute: Optional[str] = None, seed: int = 1234):
        torch.manual_seed(seed)
        self.device, self.clip_grad = device, clip_grad
        self.model = BaselineLlava(cfg).to(device)
        self.model.set_gradient_checkpointing(recompute == "full")
        self.model.train()
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(betas),
                                           eps=eps, weight_decay=weight_decay,
                                           **({"fused": True} if fused else {}))
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if bf16 else contextlib.nullcontext())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _inputs(self, batch) -> dict:
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        inputs = dict(tokens=to(batch.tokens), labels=to(batch.labels),
                      position_ids=to(batch.position_ids), cu_seqlens=batch.cu_seqlens)
        if batch.image_grid_thw.numel():
            inputs.update(pixel_values=to(batch.pixel_values), image_grid_thw=batch.image_grid_thw)
        return inputs

    def step(self, micro_batches) -> torch.Tensor:
        """Returns ``[sum of masked token losses, assistant tokens]`` (float64, CPU)."""
        tokens = sum(float(b.loss_mask.sum()) for b in micro_batches)
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            mask = batch.loss_mask.to(self.device, non_blocking=True).float()
            with self.autocast:
                per_token = self.model(**self._inputs(batch))
            loss_sum = (per_token.float() * mask).sum()
            (loss_sum / max(tokens, 1.0)).backward()
            total += loss_sum.detach()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.tensor([float(total), tokens], dtype=torch.float64)

    def close(self) -> None:
        del self.model, self.optimizer


__all__ = ["BaselineLlava", "BaselineTrainer", "count_parameters", "load_hf_state_dict"]

"""Independent references and helpers shared by the model tests (imported as a module).

``RefRiceVisual`` is a plain-PyTorch RICE-ViT + merger written from the published architecture
(LLaVA-OneVision-1.5 ``RiceTransformerPretrainedModel``): it uses HF parameter names and its own
straightforward maths (one image at a time, explicit rotate-half RoPE, explicit softmax
attention), sharing no code with ``megatron_patch.model``. The language reference is
``transformers``' own ``Qwen3ForCausalLM``.
"""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_patch.model.configs import LlavaOVConfig


# ---------------------------------------------------------------- process-group helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """(Re)initialise megatron's parallel state; a 1-process gloo group when none exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_patch.compat import apply_cpu_redirects

    apply_cpu_redirects()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- reference vision tower
def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RefRiceVisual(nn.Module):
    """RICE-ViT + merger with HF names (``visual.*`` when wrapped by ``state_dict(prefix)``)."""

    def __init__(self, cfg: LlavaOVConfig):
        super().__init__()
        v, D = cfg.vision, cfg.vision.hidden_size
        self.v, self.heads, self.hd = v, v.num_attention_heads, D // v.num_attention_heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, v.patch_size, v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.class_pos_emb = nn.Parameter(torch.randn(1, self.hd // 2))
        self.pre_layernorm = nn.LayerNorm(D, eps=1e-5)
        self.blocks = nn.ModuleList()
        for _ in range(v.num_layers):
            blk = nn.Module()
            blk.norm1, blk.norm2 = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
            blk.attn = nn.Module()
            blk.attn.qkv, blk.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            blk.mlp = nn.Module()
            blk.mlp.fc1, blk.mlp.fc2 = nn.Linear(D, v.ffn_hidden_size), nn.Linear(v.ffn_hidden_size, D)
            self.blocks.append(blk)
        M = D * v.spatial_merge_size ** 2
        self.merger = nn.Module()
        self.merger.ln_q = nn.LayerNorm(D, eps=1e-5)
        self.merger.mlp = nn.Sequential(nn.Linear(M, M), nn.GELU(), nn.Linear(M, cfg.language.hidden_size))
        for p in self.parameters():  # non-trivial norms/biases so every tensor matters
            if p.dim() == 1 and p is not self.class_embedding:
                with torch.no_grad():
                    p.add_(0.1 * torch.randn_like(p))

    def _angles(self, h: int, w: int) -> torch.Tensor:
        """[h*w, hd/2] rotary angles in the 2x2-window-grouped patch order."""
        m, dim = self.v.spatial_merge_size, self.hd // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        order = lambda g: g.reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)  # noqa: E731
        angles = torch.cat([order(rr)[:, None] * inv, order(cc)[:, None] * inv], dim=-1)
        return angles.to(self.class_pos_emb.device)

    def _block(self, blk, x, cos, sin):
        n = x.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(x)).view(n, 3, self.heads, self.hd).unbind(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.hd)
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, -1)
        x = x + blk.attn.proj(o)
        return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))

    def encode(self, pixel_values, grid_thw):
        """Per-patch features after the blocks (class tokens removed), image by image."""
        outs, start = [], 0
        for t, h, w in grid_thw.tolist():
            n = t * h * w
            patches = pixel_values[start:start + n].view(n, 3, self.v.patch_size, self.v.patch_size)
            start += n
            x = torch.cat([self.class_embedding[None], self.patch_embed.proj(patches).flatten(1)])
            ang = torch.cat([self.class_pos_emb, self._angles(h, w).repeat(t, 1)])
            emb = torch.cat([ang, ang], -1)[:, None, :]  # broadcast over heads
            cos, sin = emb.cos(), emb.sin()
            x = self.pre_layernorm(x)
            for blk in self.blocks:
                x = self._block(blk, x, cos, sin)
            outs.append(x[1:])
        return torch.cat(outs)

    def forward(self, pixel_values, grid_thw):
        x = self.merger.ln_q(self.encode(pixel_values, grid_thw))
        return self.merger.mlp(x.reshape(-1, x.shape[-1] * self.v.spatial_merge_size ** 2))


def hf_qwen3(cfg: LlavaOVConfig):
    """A random tiny transformers Qwen3ForCausalLM with the language config's shape (fp32, eager)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    lm = cfg.language
    hf_cfg = Qwen3Config(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
                         intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
                         num_attention_heads=lm.num_attention_heads,
                         num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim,
                         rms_norm_eps=lm.rms_norm_eps, rope_theta=lm.rope_theta,
                         max_position_embeddings=lm.max_position_embeddings,
                         tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0)
    if getattr(hf_cfg, "rope_parameters", None) is not None:  # transformers 5 keeps theta here
        hf_cfg.rope_parameters["rope_theta"] = lm.rope_theta
    hf_cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights start at 1: make them matter
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_batch(cfg: LlavaOVConfig, grids, seq_len: int, image_rows, seed: int = 0):
    """input_ids [b, s] with one ``<|image_pad|>`` run per image (rows from ``image_rows``, in
    order), pixel_values for all images, grid_thw. Text ids avoid the special ids."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    n_patch = int(grid.prod(1).sum())
    pixel_values = torch.randn(n_patch, cfg.vision.patch_dim, generator=g)
    b = max(image_rows) + 1 if image_rows else 1
    ids = torch.randint(16, cfg.language.vocab_size, (max(b, 1), seq_len), generator=g)
    cursor = {}
    for (t, h, w), row in zip(grids, image_rows):
        n_tok = t * h * w // cfg.vision.spatial_merge_size ** 2
        start = cursor.get(row, 2)
        ids[row, start:start + n_tok] = cfg.image_token_id
        cursor[row] = start + n_tok + 2
        assert cursor[row] < seq_len, "sequence too short for its images"
    return ids, pixel_values, grid


def test_reference_images_are_independent():
    """Sanity of the reference itself: an image's features do not depend on its neighbours."""
    from megatron_patch.model.configs import get_config

    cfg = get_config("tiny")
    torch.manual_seed(0)
    ref = RefRiceVisual(cfg).eval()
    _, pix, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 6)], 40, [0, 0])
    both = ref(pix, grid)
    alone = ref(pix[16:], grid[1:])
    torch.testing.assert_close(both[4:], alone, rtol=1e-5, atol=1e-5)


@pytest.fixture
def parallel_state_1():
    init_parallel(1, 1)
    yield

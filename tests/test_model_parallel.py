"""Same weights, same batch: TP=2 (with and without sequence parallelism), PP=2 (even and
uneven), and TP=2 x PP=2 give the loss and the gradient norm of TP=1, through megatron's own
pipeline schedules over gloo on CPU; so do the chunked output-layer loss
(model/output_loss.py) under TP and sequence parallelism, against TP=1's megatron loss, and the
GPU's fused query/key/value preparation (model/qkv_fusion.py) under TP and sequence
parallelism."""
from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_patch.model import build_model, get_config
from test_model_reference import free_port, image_batch, init_parallel

SEQ, MBS, N_MICRO = 32, 2, 2


def _micro_batches(cfg):
    """Two micro-batches: (row 0 two images of different sizes, row 1 text only), then
    (row 0 text only, row 1 one image)."""
    out = []
    for seed, grids, rows in ((0, [(1, 4, 4), (1, 2, 6)], [0, 0]), (1, [(1, 6, 2)], [1])):
        ids, pix, grid = image_batch(cfg, grids, SEQ, rows, seed=seed)
        if ids.shape[0] < MBS:
            ids = torch.cat([torch.randint(16, cfg.language.vocab_size, (MBS - ids.shape[0], SEQ),
                                           generator=torch.Generator().manual_seed(seed)), ids])
        out.append(dict(input_ids=ids, position_ids=torch.arange(SEQ).expand(MBS, -1),
                        pixel_values=pix, image_grid_thw=grid,
                        labels=torch.roll(ids, -1, dims=1),
                        loss_mask=(ids != cfg.image_token_id).float()))
    return out


def run_step(full_sd, first_stage_layers=None, sequence_parallel=False, loss_chunk_tokens=0,
             recompute_modules=(), gpu_paths=False):
    """One forward/backward over N_MICRO micro-batches on the current parallel state.
    Returns the mean loss, the global grad norm and the first stage's replicated gradients
    (see `_replicated_gradients`), identical on every rank. ``gpu_paths``: the GPU's compiled
    norms (with the residual adds before them), RoPE and fused query/key/value preparation, run
    eagerly."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_patch.model.residual_norm import ResidualThenNorm
    from megatron_patch.model.sharding import load_full_state_dict
    from test_model_qkv_fusion import eager_gpu_paths

    cfg = get_config("tiny", {"decoder_first_pipeline_num_layers": first_stage_layers})
    recompute = (dict(recompute_granularity="selective", recompute_modules=list(recompute_modules))
                 if recompute_modules else {})
    model = build_model(cfg, attention_backend="local", sequence_parallel=sequence_parallel,
                        loss_chunk_tokens=loss_chunk_tokens, rope_fusion=gpu_paths,
                        norm_fusion=gpu_paths, **recompute)
    load_full_state_dict(model, full_sd)
    losses = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        mask = batch["loss_mask"]  # the chunked loss computes only these tokens
        out = model(**batch)

        def loss_func(per_token):
            loss = (per_token * mask).sum() / mask.sum()
            losses.append(loss.item())  # the schedule divides the returned tensor in place
            return loss, {"loss": loss.detach()}

        return out, loss_func

    preparations = []
    with eager_gpu_paths(True, preparations) if gpu_paths else contextlib.nullcontext():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(_micro_batches(cfg)),
            model=[model], num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=MBS,
            forward_only=False)
    if gpu_paths:  # the language model's layers (2 query heads per group) took it too
        language = cfg.language
        assert {heads for heads, _ in preparations} == {
            1, language.num_attention_heads // language.num_query_groups}, preparations
        # and each residual add its norm's kernel (model/residual_norm.py)
        assert all(isinstance(layer.self_attn_bda, ResidualThenNorm)
                   for layer in model.language_model.decoder.layers)

    if ps.get_tensor_model_parallel_world_size() > 1:
        # as the trainer's finalize_model_grads does: q/k layernorm weights are shared by all
        # heads, so each TP rank holds only its own heads' share of their gradient; under
        # sequence parallelism the norms marked `sequence_parallel` saw only this rank's tokens
        for name, p in model.named_parameters():
            if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name
                                       or getattr(p, "sequence_parallel", False)):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.double().pow(2).sum()
    loss = torch.tensor([sum(losses) / N_MICRO if losses else 0.0], dtype=torch.float64)
    if ps.is_pipeline_last_stage() and tp_rank != 0:
        loss.zero_()  # count the last stage's loss once
    if dist.get_world_size() > 1:
        dist.all_reduce(sq)
        dist.all_reduce(loss)
    norms, mismatch = _replicated_gradients(model)
    return dict(loss=loss.item(), grad_norm=math.sqrt(sq.item()), replicated_grad_norms=norms,
                replica_mismatch=mismatch)


def _replicated_gradients(model):
    """The vision tower's and adapter's parameters that every TP rank holds whole: the norm of
    each one's gradient, and the largest difference between the TP ranks' copies of it (TP
    ranks must take the same step on them, or their replicas drift apart). A part of the
    gradient that only one rank's heads see (the class token's rotary angles) shows in both."""
    from megatron.core import parallel_state as ps

    norms, mismatch = {}, torch.zeros(1, dtype=torch.float64)
    for name, p in model.named_parameters():
        if not name.startswith(("vision_model.", "adapter.")) or p.grad is None \
                or getattr(p, "tensor_model_parallel", False):
            continue
        norms[name] = p.grad.double().norm().item()
        first = p.grad.clone()
        dist.broadcast(first, ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
        mismatch = torch.maximum(mismatch, (first - p.grad).abs().max().double())
    dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, norms)
    return {k: v for part in gathered for k, v in part.items()}, mismatch.item()


def _worker(rank, world, port, sd_path, layouts, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full_sd = torch.load(sd_path)
    results = []
    for tp, pp, *settings in layouts:
        init_parallel(tp, pp)
        results.append(run_step(full_sd, *settings))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1, PP=1 weights (saved for the workers) and their loss / grad norm."""
    init_parallel(1, 1, seed=7)
    cfg = get_config("tiny")
    model = build_model(cfg, attention_backend="local")
    full_sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path_factory.mktemp("par") / "full.pt"
    torch.save(full_sd, path)
    result = run_step(full_sd)
    assert math.isfinite(result["loss"]) and result["grad_norm"] > 0
    assert result["replicated_grad_norms"]["vision_model.class_pos_emb"] > 0
    return path, result


def _spawn(world, layouts, sd_path, tmp_path):
    out = tmp_path / "results.json"
    mp.start_processes(_worker, args=(world, free_port(), str(sd_path), layouts, str(out)),
                       nprocs=world, join=True, start_method="spawn")
    return json.loads(out.read_text())


def _check(results, layouts, reference):
    for layout, result in zip(layouts, results):
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), layout
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), layout
        assert result["replicated_grad_norms"] == pytest.approx(
            reference["replicated_grad_norms"], rel=1e-5), layout
        assert result["replica_mismatch"] == 0, layout


def test_tp2_and_pp2_match_tp1(reference, tmp_path):
    sd_path, expected = reference
    # (TP, PP, layers on the first stage, sequence parallel, loss chunk tokens: 0 = megatron's
    # [, selective recompute modules[, the GPU's norms, RoPE and q/k/v preparation]])
    layouts = [(2, 1, None, False, 0), (2, 1, None, True, 0), (1, 2, None, False, 0),
               (1, 2, 1, False, 0), (2, 1, None, False, 7), (2, 1, None, True, 7),
               (2, 1, None, True, 7, ("layernorm", "mlp")), (1, 2, None, False, 0, ("mlp",)),
               (2, 1, None, True, 0, (), True)]
    _check(_spawn(2, layouts, sd_path, tmp_path), layouts, expected)


@pytest.mark.slow
def test_tp2_x_pp2_matches_tp1(reference, tmp_path):
    sd_path, expected = reference
    layouts = [(2, 2, None, False, 0), (2, 2, None, True, 0), (2, 2, None, True, 7)]
    _check(_spawn(4, layouts, sd_path, tmp_path), layouts, expected)

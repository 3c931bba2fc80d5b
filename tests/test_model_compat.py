"""CPU/gloo redirects: idempotent, scoped, and enough for megatron's DDP + optimizer (with grad
clipping) + schedule to train the model on CPU."""
from __future__ import annotations

import importlib

import pytest
import torch

from megatron_patch.compat import apply_cpu_redirects, is_applied
from megatron_patch.model import build_model, get_config
from test_model_parallel import N_MICRO, SEQ, MBS, _micro_batches
from test_model_reference import init_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU redirects are off with CUDA")


def test_apply_is_idempotent_and_redirects_cuda_factories():
    assert apply_cpu_redirects() is True and apply_cpu_redirects() is True and is_applied()
    sched = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert sched.torch.zeros(2, device="cuda").device.type == "cpu"
    assert sched.torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert sched.torch.float32 is torch.float32  # everything else is the real torch
    assert torch.cuda.current_device() == torch.device("cpu")
    # the global torch module itself is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_ddp_optimizer_clip_and_schedule_train_the_model_on_cpu():
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_parallel(1, 1, seed=3)
    cfg = get_config("tiny")
    model = build_model(cfg, attention_backend="local")
    model = DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=0.5), [model])
    batches = _micro_batches(cfg)
    losses, norms = [], []

    def forward_step(it, m):
        batch = dict(next(it))
        mask = batch.pop("loss_mask")
        out = m(**batch)
        return out, lambda t: ((t * mask).sum() / mask.sum(), {"loss": ((t * mask).sum() / mask.sum()).detach().clone()})

    for _ in range(8):
        model.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        ok, gnorm, _ = opt.step()
        assert ok and torch.isfinite(torch.tensor(gnorm))
        losses.append(sum(o["loss"].item() for o in out) / N_MICRO)
        norms.append(gnorm)
    assert losses[-1] < losses[0] - 0.1, losses
    vision_w = model.module.vision_model.decoder.layers[0].self_attention.linear_qkv.weight
    assert vision_w.main_grad.abs().sum() > 0  # the vision tower is trained through DDP buffers

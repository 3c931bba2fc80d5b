"""The pieces of one training step: the masked per-token loss, the batch-to-model glue, and
attention isolation of packed samples (through the trainer's own path: collate -> model_inputs
-> model)."""
import pytest
import torch

from megatron_patch.data.sft_sample import EncodedSample, collate, pack_samples
from megatron_patch.model import build_model, get_config
from megatron_patch.training.train_step import masked_loss, model_inputs
from test_model_reference import init_parallel


def test_masked_loss_sums_assistant_tokens_and_counts_them():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    total, tokens, report = masked_loss(mask)(per_token)
    assert total.item() == 2.0 + 3.0 + 8.0 and tokens.item() == 3
    assert report["lm loss"].tolist() == [13.0, 3.0]
    poisoned, _, _ = masked_loss(mask, poison=True)(per_token)
    assert torch.isnan(poisoned)


def _text_sample(ids):
    ids = torch.tensor(ids)
    return EncodedSample(tokens=ids, labels=torch.roll(ids, -1), loss_mask=torch.ones(len(ids)),
                         position_ids=torch.arange(len(ids)), pixel_values=torch.zeros(0, 588),
                         image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
                         seq_lengths=[len(ids)])


@pytest.fixture(scope="module")
def tiny_model():
    init_parallel(1, 1, seed=3)
    model = build_model(get_config("tiny"), attention_backend="local")
    model.eval()
    return model


def _per_token_loss(model, samples, packed):
    batch = collate([pack_samples(samples)], pad_id=0, pad_to=40, packed=packed)
    inputs = model_inputs(batch, torch.device("cpu"))
    inputs.pop("loss_mask")
    with torch.no_grad():
        return model(**inputs)[0]


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    """Changing the first packed sample leaves the second one's losses bit-identical; the same
    batch without cu_seqlens (one long causal sequence) does not, so the test can fail."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(10, 500, (12,), generator=gen), torch.randint(10, 500, (15,), generator=gen)
    changed = first.clone()
    changed[3:9] = torch.randint(10, 500, (6,), generator=gen)
    span = slice(12, 27)  # the second sample's positions

    def losses(head, packed):
        return _per_token_loss(tiny_model, [_text_sample(head.tolist()), _text_sample(second.tolist())], packed)

    assert torch.equal(losses(first, True)[span], losses(changed, True)[span])
    assert not torch.allclose(losses(first, False)[span], losses(changed, False)[span])


def test_packed_sample_equals_the_sample_alone(tiny_model):
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(10, 500, (9,), generator=gen), torch.randint(10, 500, (14,), generator=gen)
    packed = _per_token_loss(tiny_model, [_text_sample(first.tolist()), _text_sample(second.tolist())], True)
    alone = _per_token_loss(tiny_model, [_text_sample(second.tolist())], True)
    torch.testing.assert_close(packed[9:23], alone[:14], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizer_groups_follow_modules_and_freezing(optimizer, tmp_path):
    """Per-module peak LRs land in megatron's param groups; frozen params are in none."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_patch.training import arguments
    from megatron_patch.training.optimizer import (build_optimizer, build_scheduler, freeze_modules,
                                                   learning_rates_by_module)
    (tmp_path / "d" / ".nv-meta").mkdir(parents=True)
    args = arguments.validate_args(arguments.parse_args([
        "--data-path", str(tmp_path / "d"), "--tokenizer-path", str(tmp_path), "--train-iters", "10",
        "--optimizer", optimizer, "--lr", "1e-3", "--lr-adapter", "4e-3",
        "--trainable-modules", "adapter", "language_model"]), 1)
    init_parallel(1, 1, seed=5)
    model = build_model(get_config("tiny"), attention_backend="local")
    counts = freeze_modules(model, args.trainable_modules)
    assert counts["vision_model"] == 0 and counts["adapter"] > 0
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = build_optimizer(args, [ddp])
    scheduler = build_scheduler(args, opt)
    grouped = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in grouped for p in model.vision_model.parameters())
    assert all(id(p) in grouped for p in model.adapter.parameters())
    scheduler.step(increment=args.global_batch_size)
    rates = learning_rates_by_module(opt, args)
    assert set(rates) == {"adapter", "language_model"}
    assert rates["adapter"] == pytest.approx(4 * rates["language_model"])

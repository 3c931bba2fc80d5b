"""--recompute-granularity full / selective (the activation-memory options of the GPU recipe)
recompute what they should and change no number: same loss, same gradients as no recompute."""
import pytest
import torch

from megatron_patch.model import build_model, get_config
from megatron_patch.model.sharding import load_full_state_dict
from test_model_parallel import _micro_batches
from test_model_reference import init_parallel

RECOMPUTE = {
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


def loss_and_gradients(model, batch):
    """Loss and gradients of one micro-batch, and how often each language layer's core attention
    and MLP ran forward."""
    calls = {"core_attention": 0, "mlp": 0}

    def count(kind):
        def hook(*_):
            calls[kind] += 1
        return hook

    layer = model.language_model.decoder.layers[0]
    handles = [layer.self_attention.core_attention.register_forward_hook(count("core_attention")),
               layer.mlp.register_forward_hook(count("mlp"))]
    batch = dict(batch)
    mask = batch.pop("loss_mask")
    per_token = model(**batch)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    for handle in handles:
        handle.remove()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), gradients, calls


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_changes_no_number(granularity):
    init_parallel(1, 1, seed=3)
    cfg = get_config("tiny")
    batch = _micro_batches(cfg)[0]
    plain = build_model(cfg, attention_backend="local")
    weights = {name: p.detach().clone() for name, p in plain.named_parameters()}
    recomputing = build_model(cfg, attention_backend="local", **RECOMPUTE[granularity])
    load_full_state_dict(recomputing, weights)
    plain.train(), recomputing.train()

    loss, gradients, plain_calls = loss_and_gradients(plain, batch)
    loss_re, gradients_re, calls = loss_and_gradients(recomputing, batch)
    assert plain_calls == {"core_attention": 1, "mlp": 1}
    # full: the whole layer runs forward again in the backward pass; selective: only the
    # core attention (megatron's "core_attn" default), the MLP keeps its activations
    assert calls == ({"core_attention": 2, "mlp": 2} if granularity == "full"
                     else {"core_attention": 2, "mlp": 1})
    assert loss_re == loss
    assert gradients_re.keys() == gradients.keys()
    for name in gradients:
        # summed in another order under full recompute: equal to float rounding
        assert torch.allclose(gradients_re[name], gradients[name], rtol=1e-5, atol=1e-7), name

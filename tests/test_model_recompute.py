"""--recompute-granularity full / selective (the activation-memory options of the GPU recipe)
recompute what they should and change no number: same loss, same gradients as no recompute;
selective recompute of "layernorm" and "mlp" (compat/selective_recompute.py) frees what it
should."""
import pytest
import torch

from megatron_patch.model import build_model, get_config
from megatron_patch.model.sharding import load_full_state_dict
from test_model_parallel import _micro_batches
from test_model_reference import init_parallel

RECOMPUTE = {
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
    "selective_layernorm_mlp": dict(recompute_granularity="selective",
                                    recompute_modules=["layernorm", "mlp"]),
}
# forward runs of the first language layer's core attention and MLP, forward + backward
FORWARD_RUNS = {"full": {"core_attention": 2, "mlp": 2},
                "selective": {"core_attention": 2, "mlp": 1},  # megatron's default "core_attn"
                "selective_layernorm_mlp": {"core_attention": 1, "mlp": 2}}


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


def _models(recompute: dict):
    """The tiny model without and with ``recompute``, same weights, in training mode."""
    init_parallel(1, 1, seed=3)
    cfg = get_config("tiny")
    plain = build_model(cfg, attention_backend="local")
    weights = {name: p.detach().clone() for name, p in plain.named_parameters()}
    recomputing = build_model(cfg, attention_backend="local", **recompute)
    load_full_state_dict(recomputing, weights)
    plain.train(), recomputing.train()
    return cfg, plain, recomputing


@pytest.mark.parametrize("granularity", list(RECOMPUTE))
def test_recompute_changes_no_number(granularity):
    cfg, plain, recomputing = _models(RECOMPUTE[granularity])
    batch = _micro_batches(cfg)[0]

    loss, gradients, plain_calls = loss_and_gradients(plain, batch)
    loss_re, gradients_re, calls = loss_and_gradients(recomputing, batch)
    assert plain_calls == {"core_attention": 1, "mlp": 1}
    assert calls == FORWARD_RUNS[granularity]
    assert loss_re == loss
    assert gradients_re.keys() == gradients.keys()
    for name in gradients:
        # summed in another order under recompute (a reentrant backward): equal to rounding
        assert torch.allclose(gradients_re[name], gradients[name], rtol=1e-5, atol=1e-6), name


def kept_bytes_per_layer(model, batch) -> dict:
    """Bytes of the distinct storages autograd still holds for the backward once the forward
    has ended (recompute frees some after saving them), parameters excluded, per decoder layer
    of each tower."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region, storages = ["other"], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages.setdefault(storage.data_ptr(), (region[0], storage))
        return tensor

    hooks = []
    for tower in ("language_model", "vision_model"):
        for layer in getattr(model, tower).decoder.layers:
            hooks += [layer.register_forward_pre_hook(lambda *_, t=tower: region.__setitem__(0, t)),
                      layer.register_forward_hook(lambda *_: region.__setitem__(0, "other"))]
    batch = dict(batch)
    batch.pop("loss_mask")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**batch)
    for hook in hooks:
        hook.remove()
    kept = {"language_model": 0, "vision_model": 0, "other": 0}
    for where, storage in storages.values():
        kept[where] += storage.nbytes()  # read now: 0 for an output recompute discarded
    del output
    return {tower: kept[tower] / len(getattr(model, tower).decoder.layers)
            for tower in ("language_model", "vision_model")}


def test_selective_recompute_of_norms_and_mlp_frees_their_activations():
    """Both towers keep less per layer: the MLP keeps only its input, the norms' outputs are
    freed after use. What is left is at least the layer's input and the attention's tensors."""
    cfg, plain, recomputing = _models(RECOMPUTE["selective_layernorm_mlp"])
    batch = _micro_batches(cfg)[0]
    kept_plain = kept_bytes_per_layer(plain, batch)
    kept = kept_bytes_per_layer(recomputing, batch)
    language = cfg.language
    tokens = batch["input_ids"].numel()
    # without recompute the MLP alone keeps its fc1 output (2 x ffn for SwiGLU) and more
    mlp_bytes = tokens * 2 * language.ffn_hidden_size * 4
    assert kept_plain["language_model"] - kept["language_model"] >= mlp_bytes
    assert 0 < kept["language_model"] < 0.6 * kept_plain["language_model"]
    assert 0 < kept["vision_model"] < 0.7 * kept_plain["vision_model"]

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



def test_selective_recompute_of_norms_and_mlp_frees_their_activations():
    """What the forward leaves for the backward (benchmarks/bench_activation_memory.py's count,
    taken after the forward, when recompute has freed the norms' outputs): each MLP keeps only
    its input, in both towers, so at least the fc1 outputs (2 x FFN per token for SwiGLU, FFN
    for the vision tower's GELU MLP, fp32) are gone."""
    from trainer_runs import load_benchmark
    count = load_benchmark("bench_activation_memory").saved_activation_bytes
    cfg, plain, recomputing = _models(RECOMPUTE["selective_layernorm_mlp"])
    inputs = dict(_micro_batches(cfg)[0])
    inputs.pop("loss_mask")
    kept_plain, kept = count(plain, inputs), count(recomputing, inputs)
    language_fc1 = inputs["input_ids"].numel() * 2 * cfg.language.ffn_hidden_size * 4
    assert kept_plain["decoder_per_layer"] - kept["decoder_per_layer"] >= language_fc1
    assert 0 < kept["decoder_per_layer"] < 0.6 * kept_plain["decoder_per_layer"]
    patches = inputs["pixel_values"].shape[0]
    vision_fc1 = cfg.vision.num_layers * patches * cfg.vision.ffn_hidden_size * 4
    assert kept_plain["other"] - kept["other"] >= vision_fc1

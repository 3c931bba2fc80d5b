"""The FLOPs formula against a count done by hand and against torch's FLOP counter run over
the models (the megatron model's and the baseline's training micro-batches), and the peak table
lookups."""
import pytest

from megatron_patch.training.flops import (LanguageShape, VisionShape,
                                           language_attention_flops, language_forward_flops,
                                           peak_flops_per_device, training_flops,
                                           vision_attention_flops, vision_forward_flops)


def test_language_flops_match_a_hand_count():
    shape = LanguageShape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                          num_query_groups=1, head_dim=4, vocab_size=10)
    # per token per layer: q 2*8*8, k and v 2*8*4 each, out 2*8*8, SwiGLU 3 * 2*8*16
    linear = 128 + 64 + 64 + 128 + 768
    # a 3-token causal segment: query i attends to i+1 keys -> 1+2+3 = 6 pairs, 4*width FLOPs each
    attention = 6 * 4 * 8
    expected = 2 * (3 * linear + attention) + 2 * 3 * 8 * 10
    assert language_forward_flops(shape, [3]) == expected
    assert language_attention_flops(shape, [3]) == 2 * attention  # the part above: 2 layers


def test_vision_flops_count_the_class_token_and_the_adapter():
    shape = VisionShape(num_layers=1, hidden_size=4, ffn_hidden_size=8, patch_dim=6,
                        merge_size=2, out_hidden_size=5)
    n = 4 + 1
    per_layer = n * (2 * 4 * 12 + 2 * 16 + 2 * 2 * 4 * 8) + 4 * n * n * 4
    adapter = 2 * 1 * (16 * 16 + 16 * 5)
    assert vision_forward_flops(shape, [4]) == per_layer + 2 * 4 * 6 * 4 + adapter
    assert vision_attention_flops(shape, [4]) == 4 * n * n * 4


def test_training_counts_three_forwards_and_recompute_repeats_the_layers():
    shape = LanguageShape(2, 8, 16, 2, 1, 4, 10)
    forward = language_forward_flops(shape, [5, 7])
    logits = 2 * 12 * 8 * 10  # the output layer, which full recompute does not repeat
    assert training_flops(shape, [5, 7]) == (3 * forward, 3 * forward)
    model, hardware = training_flops(shape, [5, 7], recompute="full")
    assert model == 3 * forward and hardware == 4 * forward - logits


def test_mlp_recompute_repeats_the_mlps_of_both_towers():
    """Selective recompute of "mlp": the hardware runs every MLP's forward once more, in the
    language layers (SwiGLU: 3 matmuls) and the vision layers (2 matmuls, class token
    included); the model FLOPs do not change."""
    language = LanguageShape(2, 8, 16, 2, 1, 4, 10)
    vision = VisionShape(num_layers=3, hidden_size=4, ffn_hidden_size=8, patch_dim=6,
                         out_hidden_size=8)
    plain = training_flops(language, [5, 7], vision, [4, 8])
    model, hardware = training_flops(language, [5, 7], vision, [4, 8], recompute="mlp")
    language_mlps = 2 * 12 * 3 * 2 * 8 * 16
    vision_mlps = 3 * (5 + 9) * 2 * 2 * 4 * 8
    assert model == plain[0] and hardware == plain[1] + language_mlps + vision_mlps


def test_chunked_loss_hardware_flops_count_the_loss_tokens_logits_only():
    """The chunked loss runs the output layer on the loss tokens only: MFU's model FLOPs stay
    the model's; the hardware FLOPs trade 3x every token's logits for 3x the loss tokens'."""
    shape = LanguageShape(2, 8, 16, 2, 1, 4, 10)
    forward = language_forward_flops(shape, [5, 7])
    per_token_logits = 2 * 8 * 10
    model, hardware = training_flops(shape, [5, 7], loss_tokens=3)
    assert model == 3 * forward
    assert hardware == 3 * forward - 3 * 12 * per_token_logits + 3 * 3 * per_token_logits


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H200", 989e12),
                                       ("cpu", None), (None, None)])
def test_peak_table(name, peak):
    assert peak_flops_per_device(name) == peak


def test_a_micro_batch_counts_its_loss_tokens_for_the_chunked_loss():
    from types import SimpleNamespace

    import torch

    from megatron_patch.training.interval_stats import batch_flops
    shape = LanguageShape(2, 8, 16, 2, 1, 4, 10)
    batch = SimpleNamespace(tokens=torch.zeros(1, 12, dtype=torch.long),
                            cu_seqlens=torch.tensor([0, 5, 12]), image_grid_thw=torch.zeros(0, 3),
                            loss_mask=torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0.0]]))
    vision = VisionShape(1, 4, 8, 6)
    assert batch_flops(batch, shape, vision, False) == training_flops(shape, [5, 7])
    assert batch_flops(batch, shape, vision, False, chunked_loss=True) == \
        training_flops(shape, [5, 7], loss_tokens=3)


# ------------------------------------------ the formula against the models' own operators

def recompute_args(granularity=None, method="uniform", layers=1, modules=None, stages=1):
    """The trainer's recompute switches (arguments.add_recompute_arguments)."""
    from types import SimpleNamespace
    return SimpleNamespace(recompute_granularity=granularity, recompute_method=method,
                           recompute_num_layers=layers, recompute_modules=modules,
                           pipeline_model_parallel_size=stages)


RECOMPUTE_CASES = {"none": recompute_args(),
                   "selective mlp": recompute_args("selective", modules=["mlp"]),
                   "full": recompute_args("full"),
                   "full, block of 3": recompute_args("full", "block", 3)}


def _attention_pairs(query_shape, key_shape, is_causal: bool) -> int:
    """(query, key) pairs scored in one SDPA call on ``[b, heads, n, d]`` tensors, for every
    head: a causal call scores each query against itself and the keys before it."""
    b, heads, n, m = query_shape[0], query_shape[1], query_shape[2], key_shape[2]
    return b * heads * (n * (n + 1) // 2 if is_causal else n * m)


def _attention_forward(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False,
                       out_shape=None, **kwargs):
    return 2 * _attention_pairs(query_shape, key_shape, is_causal) * (
        query_shape[-1] + value_shape[-1])


def _attention_backward(grad_shape, query_shape, key_shape, value_shape, out_shape_, lse_shape,
                        dropout_p=0.0, is_causal=False, out_shape=None, **kwargs):
    return 2 * _attention_forward(query_shape, key_shape, value_shape, is_causal=is_causal)


def _accumulating_gemm(into_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted_flops(step) -> int:
    """The FLOPs torch's FLOP counter sees while ``step()`` runs: GEMMs (in-place accumulating
    ones too, which its table lacks), convolutions, and the CPU's SDPA kernel (not in its table
    either), scored as the MFU formula scores attention: 4 x head_dim FLOPs per (query, key)
    pair and head, causal calls the pairs at or before each query, the backward twice the
    forward. Batched matmuls are left out: here they are megatron's RoPE angle table."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    formulas = {aten.addmm_: _accumulating_gemm,
                aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}
    with FlopCounterMode(display=False, custom_mapping=formulas) as mode:
        step()
    counts = mode.get_flop_counts()["Global"]
    assert any("attention" in str(op) for op in counts), counts  # attention was counted
    return sum(flops for op, flops in counts.items() if str(op) != "aten.bmm")


def _pack_and_shapes():
    from megatron_patch.model import get_config
    from megatron_patch.training.interval_stats import model_shapes
    from trainer_runs import load_benchmark
    bench = load_benchmark("bench_launches")
    args = bench.parse_args(["--model", "tiny", "--seq-length", "1024", "--image-size-min", "56",
                             "--image-size-max", "112", "--pack", "1", "--full-widths"])
    # query width (heads x head_dim = 96) unlike the hidden size (64), as in Qwen3
    cfg = get_config("tiny", {"language.head_dim": 24})
    pack = bench.synthetic_pack(args, cfg)
    assert pack.num_images == 2 and 0 < pack.loss_mask.count_nonzero() < pack.tokens.numel()
    return cfg, pack, model_shapes(cfg)


def _expected(pack, shapes, recompute, chunked_loss: bool, recomputed_layers=None) -> float:
    """HFU's hardware FLOPs of the micro-batch (the trainer's interval_stats.batch_flops)."""
    from megatron_patch.training.interval_stats import batch_flops
    return batch_flops(pack, *shapes, recompute, chunked_loss, recomputed_layers)[1]


def _megatron_model(cfg, loss_chunk_tokens: int = 0, recompute=RECOMPUTE_CASES["none"]):
    from megatron_patch.model import build_model
    from megatron_patch.training import kernels
    return build_model(cfg, attention_backend="local", loss_chunk_tokens=loss_chunk_tokens,
                       **kernels.recompute_config(recompute))


def test_model_flops_are_three_times_the_forward_the_megatron_model_runs():
    """MFU's FLOPs: 3 x the forward the model runs with megatron's output layer (every token's
    logits), both towers and their attention included."""
    import torch
    from megatron_patch.training.interval_stats import batch_flops
    from megatron_patch.training.parallel_setup import initialize, shutdown
    from megatron_patch.training.train_step import model_inputs
    cfg, pack, shapes = _pack_and_shapes()
    initialize(1, 1, 1234)
    try:
        model = _megatron_model(cfg)
        inputs = model_inputs(pack, torch.device("cpu"))
        with torch.no_grad():
            counted = counted_flops(lambda: model(**inputs))
    finally:
        shutdown()
    assert 3 * counted == batch_flops(pack, *shapes, None)[0]


@pytest.mark.parametrize("loss_chunk_tokens,case", [(0, "none"), (64, "none"),
                                                    (64, "selective mlp"), (0, "full"),
                                                    (64, "full, block of 3")])
def test_hardware_flops_are_what_the_megatron_model_runs(loss_chunk_tokens, case):
    """HFU's count equals, FLOP for FLOP, what torch's counter sees in a training micro-batch
    of the model (forward and backward, images included): megatron's output layer or the
    chunked loss on the loss tokens (forward, input and weight gradient), and each recompute's
    repeats (full: both towers' layers, not the patch embedding, adapter or output layer; by
    blocks: the first 3 of the 4 language layers and both vision layers), as the trainer passes
    them (kernels.recomputed_flops, kernels.recomputed_layers)."""
    import torch
    from megatron_patch.training import kernels
    from megatron_patch.training.parallel_setup import initialize, shutdown
    from megatron_patch.training.train_step import model_inputs
    cfg, pack, shapes = _pack_and_shapes()
    recompute = RECOMPUTE_CASES[case]
    initialize(1, 1, 1234)
    try:
        model = _megatron_model(cfg, loss_chunk_tokens, recompute)
        inputs = model_inputs(pack, torch.device("cpu"))

        def step():
            (model(**inputs) * inputs["loss_mask"]).sum().backward()

        counted = counted_flops(step)
    finally:
        shutdown()
    assert counted == _expected(pack, shapes, kernels.recomputed_flops(recompute),
                                loss_chunk_tokens > 0, kernels.recomputed_layers(recompute, cfg))


def test_block_recompute_repeats_the_first_layers_of_each_stage_and_of_the_vision_tower():
    """megatron's block method checkpoints the first N layers of each pipeline stage's block
    (uneven first/last stages included) and of the vision tower, built whole on stage 0."""
    from megatron_patch.model import get_config
    from megatron_patch.training.kernels import recomputed_layers
    cfg = get_config("tiny", {"num_layers": 6, "vision_num_layers": 2})
    assert recomputed_layers(recompute_args("full"), cfg) is None  # uniform: every layer
    assert recomputed_layers(recompute_args("selective"), cfg) is None
    assert recomputed_layers(recompute_args("full", "block", 1), cfg) == (1, 1)
    assert recomputed_layers(recompute_args("full", "block", 5), cfg) == (5, 2)
    assert recomputed_layers(recompute_args("full", "block", 2, stages=2), cfg) == (4, 2)
    # stages of 1, 3 and 3 layers
    uneven = get_config("tiny", {"num_layers": 7, "decoder_first_pipeline_num_layers": 1})
    assert recomputed_layers(recompute_args("full", "block", 2, stages=3), uneven) == (1 + 2 + 2, 2)


@pytest.mark.parametrize("recompute", [None, "full"])
def test_hardware_flops_are_what_the_baseline_runs(recompute):
    """The plain-PyTorch baseline (benchmarks/baseline_llava.py) is measured with the same
    formula: its logits over every token and, under full recompute, its per-layer
    torch.utils.checkpoint, which stops before each layer's last matmul
    (benchmarking/throughput.recompute_as_run)."""
    import torch
    from megatron_patch.benchmarking.runners import load_baseline
    from megatron_patch.benchmarking.throughput import recompute_as_run
    cfg, pack, shapes = _pack_and_shapes()
    baseline = load_baseline().BaselineTrainer(cfg, torch.device("cpu"), recompute=recompute)
    inputs = baseline._inputs(pack)

    def step():
        (baseline.model(**inputs) * pack.loss_mask).sum().backward()

    as_run = recompute_as_run("baseline", recompute)
    assert counted_flops(step) == _expected(pack, shapes, as_run, chunked_loss=False)

"""GPU checks (``gpu`` marker; skipped without CUDA): the model on CUDA in bf16 matches fp32 and
the independent references; the Transformer Engine + flash spec matches the SDPA spec to bf16
tolerance on one layer and one step (skipped where TE is not installed); torch's varlen flash
kernel matches the per-segment SDPA loop for packed sequences."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA and `pytest -m gpu` (the CPU suite hides GPUs: conftest)",
                allow_module_level=True)

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_patch.model import build_model, get_config  # noqa: E402
from megatron_patch.model.attention import (covering_packed_seq_params,  # noqa: E402
                                            flash_varlen_kernel, with_fixed_segments)
from megatron_patch.model.hf_mapping import hf_to_mcore  # noqa: E402
from megatron_patch.model.layer_specs import te_available  # noqa: E402
from megatron_patch.model.sharding import load_full_state_dict  # noqa: E402
from test_model_reference import RefRiceVisual, hf_qwen3, image_batch, init_parallel  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _setup(overrides=None):
    init_parallel(1, 1)
    cfg = get_config("tiny", overrides)
    torch.manual_seed(0)
    ref_visual, hf_lm = RefRiceVisual(cfg).eval(), hf_qwen3(cfg)
    full = hf_to_mcore({**{"visual." + k: v for k, v in ref_visual.state_dict().items()},
                        **hf_lm.state_dict()}, cfg)
    ids, pix, grid = image_batch(cfg, [(1, 4, 4), (1, 2, 6)], 48, [0, 1])
    batch = dict(input_ids=ids, position_ids=torch.arange(48).expand(2, -1), pixel_values=pix,
                 image_grid_thw=grid, labels=torch.roll(ids, -1, dims=1))
    return cfg, ref_visual, hf_lm, full, {k: v.to(DEV) for k, v in batch.items()}


def _model(cfg, full, backend, dtype):
    model = build_model(cfg, attention_backend=backend, params_dtype=dtype)
    load_full_state_dict(model, full)
    return model.to(DEV)  # megatron may initialise on CPU (use_cpu_initialization); run on the GPU


def test_local_spec_on_cuda_fp32_matches_references_and_bf16_is_close():
    cfg, ref_visual, hf_lm, full, batch = _setup()
    ref_visual, hf_lm = ref_visual.to(DEV), hf_lm.to(DEV)
    fp32 = _model(cfg, full, "local", torch.float32).eval()
    logits_in = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = fp32(**logits_in)
        emb = hf_lm.get_input_embeddings()(batch["input_ids"])
        mask = (batch["input_ids"] == cfg.image_token_id)[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, ref_visual(batch["pixel_values"], batch["image_grid_thw"]))
        want = hf_lm(inputs_embeds=emb).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    bf16 = _model(cfg, full, "local", torch.bfloat16).eval()
    with torch.no_grad():
        loss32 = fp32(**batch).mean()
        loss16 = bf16(**batch).float().mean()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


@pytest.mark.skipif(te_available() is not None, reason=f"TE spec unavailable: {te_available()}")
def test_te_flash_spec_matches_sdpa_spec_bf16_one_layer_one_step():
    cfg, _, _, full, batch = _setup({"num_layers": 1, "vision_num_layers": 1})
    full = {k: v for k, v in full.items()
            if ".layers." not in k or ".layers.0." in k}
    results = {}
    for backend in ("te", "local"):
        model = _model(cfg, full, backend, torch.bfloat16).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-1)
        loss = model(**batch).float().mean()
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        opt.step()
        with torch.no_grad():
            after = model(**batch).float().mean()
        results[backend] = (loss.item(), grads, after.item())
    (l_te, g_te, a_te), (l_sd, g_sd, a_sd) = results["te"], results["local"]
    assert l_te == pytest.approx(l_sd, rel=1e-2)
    assert a_te == pytest.approx(a_sd, rel=1e-2)
    assert a_te < l_te  # the step trained
    local_names = {n.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
                   .replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."): n for n in g_te}
    for local_name, te_name in local_names.items():
        a, b = g_te[te_name], g_sd[local_name]
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.98, (te_name, cos.item())


@pytest.mark.skipif(flash_varlen_kernel() is None, reason="torch has no varlen_attn (< 2.10)")
@pytest.mark.parametrize("covering", [False, True], ids=["trailing-padding", "covering"])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_varlen_path_matches_the_segment_loop_on_cuda(causal, covering):
    """The real torch varlen flash kernel against the per-segment SDPA loop, bf16, with GQA:
    outputs and input gradients to bf16 tolerance. With trailing padding outside every segment
    (the guarded path) those rows come out exactly zero; with segments covering every row
    (``CoveringPackedSeqParams``, the trainer's case: no guard) every row is the kernel's own."""
    from test_model_attention import PADDED, core_attention, packed_inputs, packed_params

    q, k, v, cu = packed_inputs(seed=3)
    if covering:  # the trailing rows become a last segment, as the trainer's collate makes them
        cu = torch.cat([cu, torch.tensor([PADDED])])
        params = covering_packed_seq_params(cu, PADDED, int((cu[1:] - cu[:-1]).max()), DEV)
    else:
        params = packed_params(cu.to(DEV))
    q, k, v = (x.to(DEV, torch.bfloat16).requires_grad_() for x in (q, k, v))
    module = core_attention(AttnMaskType.causal if causal else AttnMaskType.no_mask).to(DEV)
    assert module.flash_varlen_applies(q)
    results = []
    for varlen in (True, False):  # the fast path, then the loop
        module.flash_varlen_enabled = varlen
        out = module(q, k, v, None, packed_seq_params=params)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out.float(), [g.float() for g in grads]))
    (fast, fast_grads), (loop, loop_grads) = results
    real = int(cu[-1])
    assert torch.equal(fast[real:], torch.zeros_like(fast[real:]))  # empty when covering
    assert torch.isfinite(fast).all() and all(torch.isfinite(g).all() for g in fast_grads)
    torch.testing.assert_close(fast, loop, rtol=2e-2, atol=2e-2)
    for a, b in zip(fast_grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(flash_varlen_kernel() is None, reason="torch has no varlen_attn (< 2.10)")
def test_flash_varlen_takes_empty_segments_and_a_longest_of_every_row():
    """What the language layers' CUDA graphs pass the real kernel (``with_fixed_segments``):
    empty segments at the last row and ``max_seqlen`` = every row. Same outputs and input
    gradients as the exact segments, to the backward's atomics."""
    from test_model_attention import PADDED, core_attention, packed_inputs

    q, k, v, cu = packed_inputs(seed=4)
    cu = torch.cat([cu, torch.tensor([PADDED])])
    exact = covering_packed_seq_params(cu, PADDED, int((cu[1:] - cu[:-1]).max()), DEV)
    fixed = with_fixed_segments(exact, 12, PADDED)
    q, k, v = (x.to(DEV, torch.bfloat16).requires_grad_() for x in (q, k, v))
    module = core_attention(AttnMaskType.causal).to(DEV)
    results = []
    for params in (exact, fixed):
        out = module(q, k, v, None, packed_seq_params=params)
        results.append((out.float(), torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    (out, grads), (fixed_out, fixed_grads) = results
    torch.testing.assert_close(fixed_out, out, rtol=1e-3, atol=1e-3)
    for a, b in zip(fixed_grads, grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_packed_attention_matches_the_segment_loop_on_cuda(causal):
    """``--packed-attention-kernel cudnn``: torch's cuDNN attention over the packed segments
    (bf16, GQA through repeated KV heads) against the per-segment SDPA loop: outputs and input
    gradients to bf16 tolerance."""
    from test_model_attention import PADDED, core_attention, packed_inputs

    q, k, v, cu = packed_inputs(seed=7)
    cu = torch.cat([cu, torch.tensor([PADDED])])
    params = covering_packed_seq_params(cu, PADDED, int((cu[1:] - cu[:-1]).max()), DEV)
    q, k, v = (x.to(DEV, torch.bfloat16).requires_grad_() for x in (q, k, v))
    module = core_attention(AttnMaskType.causal if causal else AttnMaskType.no_mask).to(DEV)
    results = []
    for kernel, enabled in (("cudnn", True), ("flash", False)):  # cuDNN, then the loop
        module.config.packed_attention_kernel = kernel
        module.flash_varlen_enabled = enabled
        out = module(q, k, v, None, packed_seq_params=params)
        results.append((out.float(), torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    (fast, fast_grads), (loop, loop_grads) = results
    assert torch.isfinite(fast).all() and all(torch.isfinite(g).all() for g in fast_grads)
    torch.testing.assert_close(fast, loop, rtol=2e-2, atol=2e-2)
    for a, b in zip(fast_grads, loop_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_compiled_norms_match_torchs_on_cuda():
    """The GPU default: every decoder norm compiled (model/norms.py). bf16 forward and gradients
    against torch's own modules with the same weights, to bf16 tolerance."""
    from megatron_patch.model import norms
    torch.manual_seed(0)
    x = torch.randn(4096, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    for plain, fused in ((torch.nn.RMSNorm(128, eps=1e-6), norms.CompiledRMSNorm(128, eps=1e-6)),
                         (torch.nn.LayerNorm(128), norms.CompiledLayerNorm(128))):
        with torch.no_grad():
            for p in plain.parameters():
                p.uniform_(0.5, 1.5)
        fused.load_state_dict(plain.state_dict())
        results = []
        for module in (plain.to(DEV, torch.bfloat16), fused.to(DEV, torch.bfloat16)):
            out = module(x)
            grads = torch.autograd.grad(out.float().square().sum(), (x, module.weight))
            results.append((out.float(), [g.float() for g in grads]))
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-1)


def test_compiled_rotation_matches_megatrons_rope_on_cuda():
    """The fused RoPE kernel the GPU runs (compat/packed_rope.fused_rotation, torch.compile),
    bf16, packed layout, learned angles: output and the gradients of the input and the angles
    within bf16 rounding of a float64 rotation of the same inputs, and the output and input
    gradient within bf16 rounding of megatron's unfused rotation."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_patch.compat.packed_rope import fused_rotation, rotate

    g = torch.Generator(device=DEV).manual_seed(5)
    t = torch.randn(1024, 16, 128, device=DEV, generator=g).to(torch.bfloat16)
    freqs = torch.randn(1024, 1, 1, 128, device=DEV, generator=g) * 100
    probe = torch.randn(t.shape, device=DEV, generator=g).to(torch.bfloat16)

    def run(function, dtype):
        x, f = t.to(dtype).requires_grad_(), freqs.to(dtype if dtype == torch.float64 else
                                                      torch.float32).requires_grad_()
        out = function(x, f)
        grads = torch.autograd.grad((out.double() * probe.double()).sum(), (x, f))
        return [out.double()] + [grad.double() for grad in grads]

    reference = run(lambda x, f: rotate(x, f.squeeze(1)), torch.float64)
    fused = run(lambda x, f: fused_rotation()(x, f.squeeze(1), 1.0), torch.bfloat16)
    megatron = run(lambda x, f: rope_utils._apply_rotary_pos_emb_bshd(x.unsqueeze(1), f).squeeze(1),
                   torch.bfloat16)

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    for name, got, want in zip(("output", "input gradient", "angle gradient"), fused, reference):
        assert error(got, want) < 1e-2, (name, error(got, want))
    for name, got, want in zip(("output", "input gradient"), fused[:2], megatron[:2]):
        assert error(got, want) < 2e-2, (name, error(got, want))


def test_fused_qkv_preparation_matches_float64_on_cuda():
    """The query/key/value preparation the GPU compiles (model/qkv_fusion.py) at the benchmark
    model's language shape (and a bias), bf16: queries, keys, values and the gradients of the
    projection's output, the angles, the bias and the q/k norm weights within bf16 rounding of
    the same function in float64."""
    from megatron_patch.model.qkv_fusion import compiled_preparation, prepare_qkv

    g = torch.Generator(device=DEV).manual_seed(6)
    shape = dict(heads_per_group=2, head_dim=128, eps=1e-6, mscale=1.0)
    inputs = (torch.randn(2048, 1, 8 * 4 * 128, device=DEV, generator=g),
              torch.randn(2048, 1, 1, 128, device=DEV, generator=g) * 100,
              torch.randn(8 * 4 * 128, device=DEV, generator=g),  # a bias (the vision tower's)
              torch.rand(128, device=DEV, generator=g) + 0.5,
              torch.rand(128, device=DEV, generator=g) + 0.5)
    probes = [torch.randn(2048, 1, heads, 128, device=DEV, generator=g) for heads in (16, 8, 8)]

    def run(function, dtype):
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the model's
        dtypes = (dtype, angle_dtype, dtype, dtype, dtype)
        args = [x.to(d).requires_grad_() for x, d in zip(inputs, dtypes)]
        outs = function(*args)
        loss = sum((out.double() * probe.double()).sum() for out, probe in zip(outs, probes))
        return [out.double() for out in outs] + [
            grad.double() for grad in torch.autograd.grad(loss, args)]

    reference = run(lambda *a: prepare_qkv(*a, **shape), torch.float64)
    fused = run(compiled_preparation(*shape.values()), torch.bfloat16)
    names = ("query", "key", "value", "qkv gradient", "angle gradient", "bias gradient",
             "q norm gradient", "k norm gradient")
    for name, got, want in zip(names, fused, reference):
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-2, (name, error)


@pytest.mark.parametrize("bias", [False, True], ids=["language", "vision"])
def test_residual_add_and_norm_in_one_kernel_on_cuda(bias):
    """The attention's residual add and the pre-MLP norm compiled together
    (model/residual_norm.py), bf16 at the GPU benchmark's widths: the sum equal to megatron's
    add, the normalised sum within a rounding of the compiled norm's, the gradients within bf16
    rounding of float64 (tests/test_model_residual_norm.py)."""
    from test_model_residual_norm import check_against_megatron_and_float64
    check_against_megatron_and_float64(bias, same_norm_bits=False, device=DEV, tokens=8192,
                                       width=1024 if bias else 2048)


def test_compiled_bias_gelu_matches_float64_on_cuda():
    """The vision MLP's compiled fc1 bias + exact GELU (compat/bias_gelu.py), bf16, at a vision
    layer's width: output and the gradients of input and bias within bf16 rounding of float64."""
    from megatron_patch.compat.bias_gelu import bias_gelu, compiled_bias_gelu

    g = torch.Generator(device=DEV).manual_seed(8)
    inputs = (torch.randn(3000, 1, 4096, device=DEV, generator=g) * 3,
              torch.randn(4096, device=DEV, generator=g))
    probe = torch.randn(3000, 1, 4096, device=DEV, generator=g)

    def run(function, dtype):
        args = [x.to(dtype).requires_grad_() for x in inputs]
        out = function(*args)
        grads = torch.autograd.grad((out.double() * probe.double()).sum(), args)
        return [out.double()] + [grad.double() for grad in grads]

    reference = run(bias_gelu, torch.float64)
    for name, got, want in zip(("output", "input gradient", "bias gradient"),
                               run(compiled_bias_gelu(), torch.bfloat16), reference):
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-2, (name, error)


def test_weight_gradients_accumulate_in_fp32_without_apex():
    """compat/wgrad_accumulation on CUDA: torch's fp32-output GEMM adds each micro-batch's bf16
    weight gradient into the fp32 buffer without rounding it to bf16 first, so two micro-batches
    land nearer a float64 sum than the unfused path (a bf16 GEMM, then the add), and in place."""
    from megatron_patch.compat import wgrad_accumulation

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 8):
        pytest.skip("torch < 2.8 has no fp32-output GEMM for bf16")
    assert wgrad_accumulation.fp32_output_gemm_works(DEV, torch.bfloat16)
    g = torch.Generator(device=DEV).manual_seed(6)
    micro_batches = [(torch.randn(4096, 1024, device=DEV, generator=g).to(torch.bfloat16),
                      torch.randn(4096, 512, device=DEV, generator=g).to(torch.bfloat16))
                     for _ in range(2)]
    reference = sum(grad.double().t() @ inputs.double() for inputs, grad in micro_batches)
    fused, unfused = torch.zeros(512, 1024, device=DEV), torch.zeros(512, 1024, device=DEV)
    storage = fused.data_ptr()
    for inputs, grad in micro_batches:
        wgrad_accumulation.wgrad_gemm_accum_fp32(inputs, grad, fused)
        unfused.add_(grad.t() @ inputs)
    assert fused.data_ptr() == storage

    def error(got):
        return ((got.double() - reference).norm() / reference.norm()).item()

    assert error(fused) < 1e-5 and error(fused) < error(unfused) / 10, (error(fused),
                                                                       error(unfused))


def test_chunked_loss_on_cuda_is_as_accurate_and_peaks_lower():
    """model/output_loss.py on CUDA, bf16, 4096 tokens x 32768 vocabulary: the loss and both
    gradients as close to float64 as megatron's output layer + fused cross entropy (the CUDA
    default it replaces), and the forward + backward's peak lower by at least the difference
    between the fp32 softmax megatron keeps and the bf16 logits' gradient the chunked loss
    keeps (4096 x 32768 x (4 - 2) bytes = 256 MiB)."""
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from megatron_patch.model.output_loss import linear_cross_entropy
    init_parallel(1, 1)
    tokens, hidden_size, vocab = 4096, 1024, 32768
    g = torch.Generator(device=DEV).manual_seed(7)
    hidden = torch.randn(tokens, hidden_size, device=DEV, generator=g).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, device=DEV, generator=g) / 16).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), device=DEV, generator=g)
    upstream = torch.rand(tokens, device=DEV, generator=g)

    def run(loss_fn, dtype=None):
        h, w = (t.to(dtype or t.dtype).clone().requires_grad_() for t in (hidden, weight))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = loss_fn(h, w)
        (loss * upstream.to(loss.dtype)).sum().backward()
        torch.cuda.synchronize()
        return (loss.detach(), h.grad, w.grad), torch.cuda.max_memory_allocated() - start

    def megatron(h, w):
        logits = (h @ w.t())[:, None]
        return fused_vocab_parallel_cross_entropy(
            logits, labels[:, None], parallel_state.get_tensor_model_parallel_group())[:, 0]

    exact, _ = run(lambda h, w: torch.nn.functional.cross_entropy(
        h @ w.t(), labels, reduction="none"), torch.float64)
    reference, reference_peak = run(megatron)
    chunked, chunked_peak = run(lambda h, w: linear_cross_entropy(h, w, labels, 1024))

    def error(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    for name, got, ref, want in zip(("loss", "input gradient", "weight gradient"), chunked,
                                    reference, exact):
        assert error(got, want) <= 1.5 * error(ref, want) + 1e-4, (name, error(got, want),
                                                                  error(ref, want))
    assert chunked_peak <= reference_peak - tokens * vocab * 2, (chunked_peak, reference_peak)


def test_token_embedding_rows_into_main_grad_are_exact_and_deterministic_on_cuda():
    """compat/embedding_wgrad.py on CUDA (the trainer's path under gradient-accumulation
    fusion): 8192 lookups of 1000 distinct rows of a 32768 x 1024 bf16 table, their gradient
    added into the fp32 buffer as float64 would add it, and the same bits on a second run (a
    resume compares runs bit for bit; ``index_add_`` would add repeats in any order)."""
    import torch.nn.functional as F

    from megatron_patch.compat.embedding_wgrad import rows_into_main_grad
    g = torch.Generator(device=DEV).manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(32768, 1024, device=DEV, generator=g).bfloat16())
    ids = torch.randint(0, 1000, (8192,), device=DEV, generator=g)
    upstream = torch.randn(8192, 1024, device=DEV, generator=g).bfloat16()
    buffers = []
    for _ in range(2):
        weight.main_grad = torch.zeros(weight.shape, device=DEV)
        weight.grad, weight.grad_added_to_main_grad = None, False
        with rows_into_main_grad(weight):
            out = F.embedding(ids, weight)
        (out * upstream).sum().backward()
        assert weight.grad_added_to_main_grad is True
        buffers.append(weight.main_grad)
    exact = torch.zeros(weight.shape, device=DEV, dtype=torch.float64).index_add_(
        0, ids, upstream.double())
    torch.testing.assert_close(buffers[0].double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(buffers[0], buffers[1])

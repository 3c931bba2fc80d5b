"""compat/wgrad_accumulation.py: megatron's gradient-accumulation fusion without APEX. The weight
gradient's GEMM adds into ``main_grad`` itself; megatron DDP's hook then adds nothing more."""
import collections
from unittest import mock

import pytest
import torch
from megatron.core.tensor_parallel import layers
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_patch.benchmarking import throughput
from megatron_patch.benchmarking.runners import MegatronRunner, trainer_namespace
from megatron_patch.compat import ddp_grad_adds, wgrad_accumulation
from megatron_patch.model.configs import get_config


def operands(dtype, tokens=33, out_features=6, in_features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, in_features, generator=g).to(dtype)
    grad_output = torch.randn(tokens, out_features, generator=g).to(dtype)
    main_grad = torch.randn(out_features, in_features, generator=g)
    return inputs, grad_output, main_grad


def test_fp32_operands_accumulate_in_place_in_one_gemm():
    inputs, grad_output, main_grad = operands(torch.float32)
    expected = main_grad + grad_output.t() @ inputs
    storage = main_grad.data_ptr()
    wgrad_accumulation.wgrad_gemm_accum_fp32(inputs, grad_output, main_grad)
    assert main_grad.data_ptr() == storage
    torch.testing.assert_close(main_grad, expected, rtol=1e-6, atol=1e-6)


def test_bf16_operands_without_a_mixed_gemm_take_the_unfused_arithmetic():
    """The CPU has no fp32-output GEMM for bf16: the result is DDP's unfused sum, bit for bit."""
    inputs, grad_output, main_grad = operands(torch.bfloat16)
    assert not wgrad_accumulation.fp32_output_gemm_works(torch.device("cpu"), torch.bfloat16)
    unfused = main_grad.clone().add_(grad_output.t().matmul(inputs))
    wgrad_accumulation.wgrad_gemm_accum_fp32(inputs, grad_output, main_grad)
    assert torch.equal(main_grad, unfused)


def test_three_dimensional_activations_are_flattened_like_megatrons():
    inputs, grad_output, main_grad = operands(torch.float32, tokens=12)
    expected = main_grad + grad_output.t() @ inputs
    wgrad_accumulation.wgrad_gemm_accum_fp32(inputs.view(3, 4, -1), grad_output.view(3, 4, -1),
                                             main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-6, atol=1e-6)


def test_half_precision_main_grad_accumulates_in_its_dtype():
    inputs, grad_output, main_grad = operands(torch.bfloat16)
    main_grad = main_grad.bfloat16()
    expected = torch.addmm(main_grad, grad_output.t(), inputs)
    wgrad_accumulation.wgrad_gemm_accum_fp16(inputs, grad_output, main_grad)
    assert torch.equal(main_grad, expected)


def test_probe_accepts_only_a_gemm_that_accumulates_into_its_own_output(monkeypatch):
    """The device check: an fp32-output addmm that is missing (the CPU's build), or that does not
    add into the tensor it writes (an aliasing fault), is not used."""
    cpu = torch.device("cpu")
    assert not wgrad_accumulation.accumulates_in_place(cpu, torch.bfloat16)  # no CPU kernel

    def correct(c, a, b, out_dtype, out):
        out.copy_(c + a.float() @ b.float())

    def overwrites(c, a, b, out_dtype, out):
        out.copy_(a.float() @ b.float())

    for addmm, works in ((correct, True), (overwrites, False)):
        monkeypatch.setattr(torch, "addmm", addmm)
        assert wgrad_accumulation.accumulates_in_place(cpu, torch.bfloat16) is works


def test_install_gives_megatron_the_functions_and_leaves_apex_alone(monkeypatch):
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.delattr(layers, "fused_weight_gradient_mlp_cuda", raising=False)
    wgrad_accumulation.install()
    assert layers._grad_accum_fusion_available
    assert layers.fused_weight_gradient_mlp_cuda is wgrad_accumulation
    assert not wgrad_accumulation.uses_apex()

    apex = object()
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex)
    wgrad_accumulation.install()
    assert layers.fused_weight_gradient_mlp_cuda is apex and wgrad_accumulation.uses_apex()


class OpCounter(TorchDispatchMode):
    """How many times each aten operator runs (on a GPU, about a kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


SMALL = ["--model", "tiny", "--seq-length", "256", "--image-size-min", "56",
         "--image-size-max", "112", "--text-length-median", "40", "--num-layers", "1",
         "--vision-num-layers", "1", "--grad-accum", "2", "--warmup-steps", "0", "--steps", "1"]


def gradients_after_one_step(extra):
    """The trainer's step (megatron DDP, the mixed-precision optimizer) over two micro-batches;
    the gradient buffers it leaves, by parameter name, and the linears' fusion flags. DDP's hook
    adds each gradient at once, as megatron's does (no batching, compat/ddp_grad_adds.py), so
    the operator counts show one add per gradient the hook adds."""
    from megatron_patch.training.parallel_setup import initialize, seed_everything, shutdown
    args = throughput.parse_args(SMALL + extra)
    cfg = get_config(args.model, throughput.model_overrides(args))
    train_args = trainer_namespace(args)
    synthetic = throughput._Synthetic(throughput.synthetic_spec(args, cfg, train_args), 2)
    initialize(1, 1, args.seed)
    try:
        seed_everything(args.seed)
        runner = MegatronRunner(train_args, cfg, torch.device("cpu"))
        batches, close = synthetic.open()
        with OpCounter() as ops, mock.patch.object(ddp_grad_adds, "SMALL_GRADIENT_ELEMENTS", 0):
            loss = runner.step([next(iter(batches)) for _ in range(2)])
        close()
        named = list(runner.model.module.named_parameters())
        grads = {name: p.main_grad.clone() for name, p in named if p.requires_grad}
        fused = {name for name, p in named if getattr(p, "grad_added_to_main_grad", False)}
        runner.close()
        return loss, grads, fused, ops.counts
    finally:
        shutdown()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_trainer_step_with_fusion_gives_the_unfused_gradients(precision):
    """bf16 on the CPU (no fp32-output GEMM there): the linears take the same arithmetic, so the
    same buffers bit for bit -- nothing is added twice or lost. fp32: one addmm instead of a GEMM
    and an add, equal up to rounding. The token embedding adds its rows into the buffer
    (compat/embedding_wgrad.py): no table-sized gradient and no DDP add, equal up to rounding
    (in bf16 up to the rounding of torch's table to bf16). Either way the fused weights are
    marked, so DDP's hook skips them."""
    # no clipping: it scales every buffer by the global norm, which the embedding's rounding moves
    extra = ["--clip-grad", "0"] + (["--bf16"] if precision == "bf16" else [])
    loss, grads, fused, ops = gradients_after_one_step(extra + ["--gradient-accumulation-fusion"])
    ref_loss, ref_grads, ref_fused, ref_ops = gradients_after_one_step(
        extra + ["--no-gradient-accumulation-fusion"])
    assert not ref_fused
    linear_weights = {name for name in grads if name.endswith("weight") and (
        "linear_" in name or "output_layer" in name)}
    embedding = "language_model.embedding.word_embeddings.weight"
    assert linear_weights and fused == linear_weights | {embedding}
    assert torch.equal(loss, ref_loss)
    # the launches saved: DDP's add per fused weight and micro-batch; in fp32 the GEMM and the
    # add become one addmm (bf16 on the CPU keeps the GEMM and the add, inside the fusion); the
    # embedding's table-sized backward becomes an add of its rows
    saved, linears = len(fused) * 2, len(linear_weights) * 2
    assert (ref_ops["embedding_dense_backward"], ops["embedding_dense_backward"]) == (2, 0)
    assert ops["index_put_"] - ref_ops["index_put_"] == 2
    if precision == "fp32":
        assert ref_ops["add_"] - ops["add_"] == saved
        assert (ref_ops["mm"] - ops["mm"], ops["addmm_"] - ref_ops["addmm_"]) == (linears,
                                                                                  linears)
    else:
        assert ref_ops["add_"] - ops["add_"] == 2 and ops["mm"] == ref_ops["mm"]
    for name, grad in grads.items():
        if precision == "bf16" and name != embedding:
            assert torch.equal(grad, ref_grads[name]), name
        elif precision == "bf16":  # torch rounds each micro-batch's table to bf16: 2^-9 each
            bound = 2 ** -8 * ref_grads[name].abs().max().item()
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=bound, msg=name)
        else:
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)

"""Counting GPU kernel launches from the operators a CPU run dispatches
(megatron_patch/benchmarking/launch_count.py, benchmarks/bench_launches.py)."""
import pytest
import torch

from megatron_patch.benchmarking.launch_count import count_launches, on_host, one_launch


def total(counter) -> int:
    return sum(counter.values())


def test_views_and_allocations_launch_nothing_and_each_kernel_counts_once():
    x = torch.randn(4, 6)

    def views():
        return (x.view(6, 4).t().unsqueeze(0)[0], x.reshape(24), torch.empty(3), x.contiguous(),
                x.to(torch.float32))

    counted, _ = count_launches(views)
    assert total(counted) == 0, counted
    # reshaping a transposed tensor must copy it
    counted, _ = count_launches(lambda: x.t().reshape(24))
    assert total(counted) == 1, counted

    def work():
        y = x * 2  # mul
        z = y.t().contiguous()  # a real copy
        return torch.nn.functional.dropout(z, p=0.0, training=True) + 1  # dropout: none; add

    counted, result = count_launches(work)
    assert counted["aten::mul"] == 1 and counted["aten::add"] == 1
    assert total(counted) == 3, counted  # mul, the copy, add
    torch.testing.assert_close(result, (x * 2).t() + 1)


def test_a_composite_operator_counts_once_and_the_backward_is_counted():
    x = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)

    counted, loss = count_launches(lambda: (x @ weight).sum())
    assert counted == {"aten::matmul": 1, "aten::sum": 1}
    counted, _ = count_launches(loss.backward)
    # the sum's gradient is an expand (no kernel); matmul's backward: two GEMMs; fresh .grad
    # tensors are taken as they are, not added (no kernel)
    assert counted["aten::mm"] == 2, counted
    assert "aten::add_" not in counted
    assert x.grad is not None and weight.grad is not None


def test_a_stand_in_region_is_one_launch_and_a_host_region_none():
    x = torch.randn(8)

    def stand_in():
        with one_launch("fused"):
            return (x.sin() * x.cos()).exp()

    counted, _ = count_launches(stand_in)
    assert counted == {"launch_count::fused": 1}

    def host_then_device():
        with on_host("positions"):
            positions = torch.arange(8).repeat(2)
        return x * positions[:8]

    counted, _ = count_launches(host_then_device)
    assert counted == {"aten::mul": 1}


def test_a_compiled_graph_is_counted_as_one_launch_plus_its_extern_kernels():
    @torch.compile(dynamic=False)
    def fused(a, b):
        return torch.relu(a @ b) * 2 + 1

    a, b = torch.randn(8, 8), torch.randn(8, 8)
    fused(a, b)  # compiles
    counted, result = count_launches(lambda: fused(a, b))
    assert counted["compiled graph"] == 1, counted
    assert counted.get("aten::mul", 0) == 0 and counted.get("aten::relu", 0) == 0
    torch.testing.assert_close(result, torch.relu(a @ b) * 2 + 1)


@pytest.mark.slow
def test_bench_counts_one_layer_as_the_gpu_runs_it():
    """The tiny model with the GPU's code paths: a language layer is its 4 GEMMs forward and 8
    backward, attention one kernel each way, the rest compiled graphs and residual adds."""
    from trainer_runs import load_benchmark
    bench = load_benchmark("bench_launches")
    args = bench.parse_args(["--model", "tiny", "--seq-length", "256", "--image-size-min", "56",
                             "--image-size-max", "112", "--pack", "0", "--full-widths"])
    cfg = bench.get_config(args.model, bench.arguments.model_overrides(args))
    batch = bench.synthetic_pack(args, cfg)
    with bench.gpu_code_paths():
        result = bench.parts(args, batch, torch.device("cpu"))
    layer = result["parts"]["language layer"]
    forward, backward = layer["forward"], layer["backward"]
    assert forward["aten::matmul"] == 4 and backward["aten::matmul"] == 8
    assert forward["launch_count::varlen_attention_forward"] == 1
    assert backward["launch_count::varlen_attention_backward"] == 1
    # the query/key/value preparation (split, q/k norms, their rotation, the contiguous value:
    # model/qkv_fusion.py), the attention's residual add with the pre-MLP norm, the SwiGLU, the
    # MLP's residual add with the next layer's input norm (model/residual_norm.py); no copies,
    # and no residual add or sum of the residual stream's two gradients on its own
    assert forward["compiled graph"] == 4 and backward["compiled graph"] == 4
    assert not any(forward.get(op) or backward.get(op) for op in ("aten::add", "aten::add_"))
    copies = ("aten::contiguous", "aten::reshape", "aten::cat")
    assert not any(forward.get(op) or backward.get(op) for op in copies), (forward, backward)
    # the GEMMs accumulate the weights' gradients; DDP's hook keeps the norms' and biases'
    # gradients and adds them all at the backward's end: nothing per layer, 3 launches in all
    hook = {part: {op: n for op, n in counts["backward"].items() if n and "(DDP hook)" in op}
            for part, counts in result["parts"].items()}
    assert hook == {"language layer": {}, "vision layer": {}, "rest": {
        "aten::cat (DDP hook)": 1, "aten::to (DDP hook)": 1, "aten::_foreach_add_ (DDP hook)": 1}}
    vision = result["parts"]["vision layer"]["forward"]
    assert vision["aten::matmul"] == 4 and vision["launch_count::varlen_attention_forward"] == 1
    # the preparation (with the qkv bias), the attention's bias and residual add with the
    # pre-MLP norm, the fc1 bias + GELU, the MLP's bias and residual add with the next layer's
    # input norm; no bias is added or reduced on its own
    vision_backward = result["parts"]["vision layer"]["backward"]
    assert vision["compiled graph"] == 4 and vision_backward["compiled graph"] == 4
    assert not any(vision.get(op) for op in ("aten::add", "aten::gelu")), vision
    assert not any(vision_backward.get(op) for op in ("aten::sum", "aten::gelu_backward"))
    assert result["depth"] == dict(language=cfg.language.num_layers, vision=cfg.vision.num_layers)
    # the optimizer step in multi-tensor kernels, as on a GPU: nothing once per parameter
    # (the tiny model has 70), AdamW one fused kernel per parameter group, the master weights
    # copied into the bf16 ones in one launch
    step = result["optimizer"]["step"]
    assert max(step.values()) <= 4 and step["aten::_foreach_copy_"] == 1, step
    assert step["aten::_fused_adamw_"] >= 1 and not step["aten::_foreach_addcdiv_"], step
    text = bench.report(args, result, batch)
    assert "language layer" in text and "micro-batch" in text


def test_the_attention_stand_in_keeps_what_the_varlen_kernel_keeps():
    """The GPU code paths' packed attention (benchmarking/gpu_paths.py) computes each segment's
    attention, launches once each way and saves for the backward what torch's varlen kernel
    saves: query, key, value, the segments, the output and an fp32 log-sum-exp per head and
    token, so the activation count holds the GPU's bytes."""
    from megatron_patch.benchmarking.gpu_paths import varlen_stand_in
    tokens, heads, groups, dim = 10, 4, 2, 8
    query = torch.randn(tokens, heads, dim, requires_grad=True)
    key, value = (torch.randn(tokens, groups, dim, requires_grad=True) for _ in range(2))
    segments = torch.tensor([0, 3, 10], dtype=torch.int32)
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        counted, out = count_launches(lambda: varlen_stand_in(
            query, key, value, segments, segments, 7, 7, window_size=(-1, 0)))
    assert total(counted) == 1 and counted["launch_count::varlen_attention_forward"] == 1
    assert [tuple(t.shape) for t in saved] == [(tokens, heads, dim), (tokens, groups, dim),
                                               (tokens, groups, dim), (3,), (tokens, heads, dim),
                                               (heads, tokens)]
    assert saved[-1].dtype == torch.float32 and saved[4] is out
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1),
        is_causal=True, enable_gqa=True).transpose(0, 1) for a, b in ((0, 3), (3, 10))])
    torch.testing.assert_close(out, expected)
    counted, _ = count_launches(lambda: out.sum().backward())
    assert counted["launch_count::varlen_attention_backward"] == 1

"""The GPU's compiled kernels compile while training warms up, and never again.

On a GPU each torch.compile'd function (norms, the query/key/value preparation, RoPE, SwiGLU,
bias-GELU, bias-dropout-add, the chunked loss) compiles for the first shapes it sees, a few
seconds each. A guard that fails later (a shape marked static, a stride, a grad mode) compiles
again inside the timed steps, where a benchmark reads it as a slow step, and past dynamo's
recompile limit the function silently runs eagerly from then on. Packs differ in images,
patches and segments from one micro-batch to the next, so this trains the tiny model through
the GPU's code paths (torch.compile's CPU build: the same guards) on packs of different
shapes, with an evaluation pass between them, and counts the graphs dynamo builds."""
import pytest
import torch
from torch._dynamo.utils import counters

from megatron_patch.benchmarking.gpu_paths import gpu_code_paths

from trainer_runs import load_benchmark

PACKS, EVALUATED = 7, (2, 4, 6)  # evaluation before training on these


def _packs(bench, args, cfg, count):
    """``count`` synthetic packs, no two with the same number of image patches: each shape the
    vision tower sees is new (a shape seen before could reuse a graph compiled for it)."""
    packs = bench.synthetic_packs(args, cfg).take(8 * count)
    by_patches = {int(pack.image_grid_thw.prod(dim=1).sum()): pack for pack in reversed(packs)}
    assert len(by_patches) >= count, sorted(by_patches)
    return list(by_patches.values())[:count]


@pytest.mark.slow
def test_gpu_kernels_compile_in_the_first_micro_batches_and_never_again():
    from megatron_patch.training.parallel_setup import initialize, shutdown
    from megatron_patch.training.train_step import model_inputs
    bench = load_benchmark("bench_launches")
    args = bench.parse_args(["--model", "tiny", "--seq-length", "512", "--image-size-min", "56",
                             "--image-size-max", "168", "--full-widths"])
    cfg = bench.get_config(args.model, bench.arguments.model_overrides(args))
    packs = _packs(bench, args, cfg, PACKS)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    with gpu_code_paths():
        initialize(1, 1, args.seed)
        try:
            model = bench.build_model(cfg, attention_backend="local", params_dtype=torch.bfloat16,
                                      **bench.build_options(args))
            for index, pack in enumerate(packs):
                inputs = model_inputs(pack, torch.device("cpu"))
                if index in EVALUATED:
                    model.eval()
                    with torch.no_grad():
                        model(**inputs)
                    model.train()
                (model(**inputs).float() * inputs["loss_mask"].float()).sum().backward()
                graphs.append(counters["stats"]["unique_graphs"])
        finally:
            shutdown()
            torch._dynamo.reset()
    # the first two training micro-batches and the first two evaluations compile: the second
    # of each marks the sizes that changed dynamic where a function was compiled static
    # (megatron's bias-dropout-adds); from then on every pack, trained or evaluated, reuses them
    assert graphs[0] > 0 and graphs[2] > graphs[1], graphs
    assert graphs[5:] == [graphs[4]] * 2, graphs
    # and none gave up: no graph break, no function past the recompile limit left to run eagerly
    assert not counters["unimplemented"] and not counters["graph_break"], dict(counters)

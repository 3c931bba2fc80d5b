"""The trainer in the example scripts' GPU configuration (``gpu`` marker; skipped without CUDA):
bf16 with fp32 master weights, distributed optimizer with overlapped grad reduce and param
gather, full recompute, packing; the attention backend megatron-core picks (TE + flash where
installed). It must learn, save, and resume from its checkpoint to the uninterrupted run's
losses within bf16/atomics noise (GPU kernels are not bit-reproducible, unlike the CPU tests)."""
import json

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA and `pytest -m gpu` (the CPU suite hides GPUs: conftest)",
                allow_module_level=True)

from trainer_runs import metrics, run_trainer, tensorboard_scalars  # noqa: E402

GPU_RUN = ("--train-iters", 8, "--save-interval", 4, "--packing", "--micro-batch-size", 1,
           "--seq-length", 1024, "--global-batch-size", 4, "--bf16",
           "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
           "--recompute-granularity", "full", "--eval-interval", 4, "--eval-iters", 2)


def test_gpu_configuration_trains_saves_and_resumes(converted_demo, demo_tokenizer, tmp_path):
    reference = tmp_path / "reference"
    run_trainer(converted_demo, demo_tokenizer, reference, *GPU_RUN)
    records = metrics(reference)
    losses = [records[i]["train/loss"] for i in range(1, 9)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert 0 < records[8]["throughput/mfu"] < 1  # the GPU's peak is known (flops.py's table)
    assert records[8]["memory/peak_gib"] > 0
    adam = json.loads((reference / "run_config.json").read_text())["kernels"]["adam"]
    assert adam in ("torch AdamW, fused kernel", "Transformer Engine / APEX FusedAdam")

    resumed = tmp_path / "resumed"
    run_trainer(converted_demo, demo_tokenizer, resumed, *GPU_RUN,
                "--load", reference / "iter_0000004")
    expected, actual = metrics(reference), metrics(resumed)
    for iteration in range(5, 9):
        assert actual[iteration]["train/loss"] == pytest.approx(
            expected[iteration]["train/loss"], rel=2e-2), iteration


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", 2, "--sequence-parallel"),
                                    ("--pipeline-model-parallel-size", 2)], ids=["tp2-sp", "pp2"])
def test_two_gpus_train_as_one(layout, converted_demo, demo_tokenizer, tmp_path):
    """NCCL across ranks: the trainer's own collectives (stop flag, counters, eval loss, save
    vote) and megatron's, with the same losses as one GPU to bf16 noise (data parallel size 1,
    so both read the same samples)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_trainer(converted_demo, demo_tokenizer, one, *GPU_RUN)
    run_trainer(converted_demo, demo_tokenizer, two, *GPU_RUN, *layout, nproc=2)
    expected, actual = metrics(one), metrics(two)
    for iteration in range(1, 9):
        assert actual[iteration]["train/loss"] == pytest.approx(
            expected[iteration]["train/loss"], rel=2e-2), iteration
    assert (two / "iter_0000008").is_dir()


def test_memory_history_is_written_after_the_first_iteration(converted_demo, demo_tokenizer,
                                                             tmp_path):
    """--record-memory-history: rank 0's allocator snapshot and, next to it, what was alive at
    the recorded peak by source line (the weights' and the optimizer's allocations among it)."""
    save = tmp_path / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *GPU_RUN, "--train-iters", 3,
                "--record-memory-history")
    assert (save / "memory_snapshot_rank0.pickle").stat().st_size > 0
    summary = (save / "memory_snapshot_rank0.txt").read_text().splitlines()
    assert summary[0].startswith("rank 0, recorded after the first iteration: ")
    assert len(summary) > 3 and "GiB" in summary[2]


def test_cuda_graphs_train_like_eager_and_resume(converted_demo, demo_tokenizer, tmp_path):
    """--cuda-graph-impl local: megatron-core records the language layers in iteration 1,
    captures them at its end and replays them from then on (evaluation too). The losses follow
    the eager run's to bf16/atomics noise, and a resumed run captures again and continues
    the same. At most 4 samples per pack, so the segments are padded (5 per captured pack)."""
    run = tuple(arg for arg in GPU_RUN if arg not in ("--recompute-granularity", "full"))
    run += ("--max-samples-per-pack", 4)
    eager, graphs, resumed = tmp_path / "eager", tmp_path / "graphs", tmp_path / "resumed"
    run_trainer(converted_demo, demo_tokenizer, eager, *run)
    run_trainer(converted_demo, demo_tokenizer, graphs, *run, "--cuda-graph-impl", "local")
    log = "".join(path.read_text() for path in graphs.glob("run_*.log"))
    assert "cuda graph(s)" in log, log[-3000:]  # megatron's "built N cuda graph(s)" line
    kernels = json.loads((graphs / "run_config.json").read_text())["kernels"]
    assert kernels["cuda_graphs"] == "language layers, packs of 5 segments"
    expected, actual = metrics(eager), metrics(graphs)
    for iteration in range(1, 9):
        assert actual[iteration]["train/loss"] == pytest.approx(
            expected[iteration]["train/loss"], rel=2e-2), iteration
    eager_eval = tensorboard_scalars(eager / "tensorboard")["eval/loss"]
    graphs_eval = tensorboard_scalars(graphs / "tensorboard")["eval/loss"]
    assert set(graphs_eval) == {4, 8}  # evaluated on the replayed graphs
    for iteration in (4, 8):
        assert graphs_eval[iteration] == pytest.approx(eager_eval[iteration], rel=2e-2)

    run_trainer(converted_demo, demo_tokenizer, resumed, *run, "--cuda-graph-impl", "local",
                "--load", graphs / "iter_0000004")
    again = metrics(resumed)
    for iteration in range(5, 9):
        assert again[iteration]["train/loss"] == pytest.approx(
            actual[iteration]["train/loss"], rel=2e-2), iteration


def test_selective_recompute_inside_cuda_graphs_trains_like_eager(converted_demo, demo_tokenizer,
                                                                   tmp_path):
    """--recompute-granularity selective --recompute-modules layernorm mlp, the H100 fit that
    works with graphs (full recompute does not): the norms' and MLPs' recompute is captured
    inside the language layers' graphs (compat/selective_recompute.py's checkpoint wrapper
    included), the vision tower recomputes eagerly; the losses follow the eager run without
    recompute to bf16/atomics noise."""
    run = tuple(arg for arg in GPU_RUN if arg not in ("--recompute-granularity", "full"))
    run += ("--max-samples-per-pack", 4)
    eager, recomputing = tmp_path / "eager", tmp_path / "recomputing"
    run_trainer(converted_demo, demo_tokenizer, eager, *run)
    run_trainer(converted_demo, demo_tokenizer, recomputing, *run, "--cuda-graph-impl", "local",
                "--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp")
    kernels = json.loads((recomputing / "run_config.json").read_text())["kernels"]
    assert kernels["recompute"] == "selective (layernorm, mlp)" and kernels["cuda_graphs"]
    expected, actual = metrics(eager), metrics(recomputing)
    for iteration in range(1, 9):
        assert actual[iteration]["train/loss"] == pytest.approx(
            expected[iteration]["train/loss"], rel=2e-2), iteration

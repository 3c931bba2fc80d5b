"""The trainer in the example scripts' GPU configuration (``gpu`` marker; skipped without CUDA):
bf16 with fp32 master weights, distributed optimizer with overlapped grad reduce and param
gather, full recompute, packing; the attention backend megatron-core picks (TE + flash where
installed). It must learn, save, and resume from its checkpoint to the uninterrupted run's
losses within bf16/atomics noise (GPU kernels are not bit-reproducible, unlike the CPU tests)."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA and `pytest -m gpu` (the CPU suite hides GPUs: conftest)",
                allow_module_level=True)

from trainer_runs import metrics, run_trainer  # noqa: E402

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

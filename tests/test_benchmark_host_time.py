"""The host-time benchmark (benchmarks/bench_host_time.py): it times the trainer's real step with
the choices a GPU makes, with attention as one launch each way, and extrapolates to zero tokens."""
from unittest import mock

import pytest
import torch

from megatron_patch.benchmarking.launch_count import count_launches
from megatron_patch.training import kernels

from trainer_runs import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_host_time")


def test_the_trainer_chooses_the_gpus_kernels_inside_the_benchmarks_paths_only(bench):
    args = bench.trainer_args(bench.parse_args(["--model", "tiny"]), 256)
    with bench.gpu_step_paths():
        on_gpu = kernels.model_options(args)
        assert kernels.gradient_accumulation_fusion(args) is True
    assert on_gpu["rope_fusion"] and on_gpu["norm_fusion"] and on_gpu["fused_kernels"]
    assert on_gpu["loss_chunk_tokens"] == kernels.DEFAULT_LOSS_CHUNK_TOKENS
    on_cpu = kernels.model_options(args)  # the patches are gone again
    assert not (on_cpu["rope_fusion"] or on_cpu["norm_fusion"] or on_cpu["loss_chunk_tokens"])
    assert kernels.gradient_accumulation_fusion(args) is False


def test_attention_is_one_launch_each_way_with_gradients_of_the_inputs_shapes(bench):
    query = torch.randn(10, 4, 16, requires_grad=True)
    key, value = (torch.randn(10, 2, 16, requires_grad=True) for _ in range(2))
    segments = torch.tensor([0, 6, 10], dtype=torch.int32)
    forward, out = count_launches(lambda: bench.one_allocation_attention(
        query, key, value, segments, segments, 6, 6, scale=0.25, window_size=(-1, 0)))
    assert out.shape == (10, 4, 16)
    grad = torch.ones_like(out)
    backward, _ = count_launches(lambda: out.backward(grad))
    assert forward == {"launch_count::varlen_attention_forward": 1}
    assert backward == {"launch_count::varlen_attention_backward": 1}
    assert [x.grad.shape for x in (query, key, value)] == [x.shape for x in (query, key, value)]


def test_the_time_at_zero_tokens_is_the_intercept_of_the_two_lengths(bench):
    short = dict(seq_length=256, step_seconds=1.0 + 256 * 0.002)
    long = dict(seq_length=512, step_seconds=1.0 + 512 * 0.002)
    assert bench.extrapolate(short, long, "step_seconds") == pytest.approx(1.0)


def test_both_lengths_are_timed_interleaved_with_every_step_and_update(bench):
    # the compiled kernels off: their CPU compilation is tested elsewhere and slow here
    args = bench.parse_args(["--model", "tiny", "--seq-lengths", "64", "128", "--steps", "2",
                             "--warmup-steps", "1", "--micro-batches", "2", "--no-rope-fusion",
                             "--no-norm-fusion", "--no-bias-swiglu-fusion",
                             "--loss-chunk-tokens", "0"])
    cfg = bench.model_config(args)
    lengths_stepped = []
    calls = mock.Mock(wraps=bench.one_allocation_attention)
    step = bench.MegatronRunner.step

    def recorded_step(runner, batches):
        lengths_stepped.append(batches[0].tokens.shape[-1])
        return step(runner, batches)

    with mock.patch.object(bench, "one_allocation_attention", calls), \
            mock.patch.object(bench.MegatronRunner, "step", recorded_step), bench.gpu_step_paths():
        rows = bench.measure(args, cfg)
    # warm-up and timed rounds alternate the lengths; then the counted step (the shorter)
    assert lengths_stepped == [64, 128] * 3 + [64]
    assert [row["seq_length"] for row in rows] == [64, 128]
    for row in rows:
        assert len(row["steps"]) == 2 and len(row["updates"]) == 2
        assert row["step_seconds"] == min(row["steps"]) > row["update_seconds"] > 0
        assert row["samples"] >= 2 and row["images"] >= 2
    layers = cfg.language.num_layers + cfg.vision.num_layers
    assert calls.call_count == layers * args.micro_batches * len(lengths_stepped)
    assert rows[0]["kernels"]["gradient_accumulation_fusion"] is True
    assert rows[0]["launches"] > 0
    assert bench.megatron_optimizer.clip_grad_by_total_norm_fp32 \
        is not bench.bench_launches.clip_as_on_a_gpu  # only while measuring

"""The throughput benchmark (tools/benchmark_throughput.py), its synthetic packed batches and the
plain-PyTorch baseline trainer (benchmarks/baseline_llava.py)."""
import json
import math
import sys

import pytest
import torch

from megatron_patch.benchmarking.runners import load_baseline
from megatron_patch.benchmarking.synthetic import SyntheticPackedBatches, SyntheticSpec
from megatron_patch.benchmarking.throughput import format_report
from megatron_patch.benchmarking.throughput import main as benchmark_main
from megatron_patch.model import build_model, count_parameters, get_config

from trainer_runs import load_benchmark

SMALL = ["--model", "tiny", "--seq-length", "256", "--image-size-min", "56",
         "--image-size-max", "112", "--text-length-median", "40"]


def _spec(cfg, **kw):
    values = dict(vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
                  seq_length=256, images_per_sample=2, image_side_min=56, image_side_max=168,
                  text_length_median=40, max_images_per_pack=6, seed=3)
    values.update(kw)
    return SyntheticSpec(**values)


def test_tool_measures_both_trainers_on_the_same_batches(tmp_path):
    out = tmp_path / "bench.json"
    # --init-method-std 0.02 (tiny's preset is 0.125): at a small init a fresh model predicts
    # about uniformly, so both trainers' first loss is ~ln(vocab), checked below
    assert benchmark_main(SMALL + ["--num-layers", "2", "--warmup-steps", "1", "--steps", "2", "--grad-accum", "2",
                                   "--trainer", "both", "--peak-tflops", "0.5",
                                   "--init-method-std", "0.02", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["same_batches"] is True
    results = report["results"]
    assert set(results) == {"megatron", "baseline"}
    for name, r in results.items():
        assert r["tokens_per_s_per_device"] > 0 and r["samples_per_s_per_device"] > 0, name
        assert 0.0 <= r["data_wait_fraction"] <= 1.0
        assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 3
        assert r["step_time_s"] == pytest.approx(sum(r["step_times_s"]) / 2)
        assert r["tokens_per_s_per_device"] == pytest.approx(
            2 * r["tokens_per_step"] / sum(r["step_times_s"]), rel=1e-6)
        # MFU = model FLOPs / time / peak; no recompute: the hardware FLOPs are the model
        # FLOPs less the patch embedding's input gradient (pixels take none), a few percent of
        # this tiny model's (the exact count is tests/test_training_flops.py's)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s_per_device"] / 0.5)
        assert 0.95 * r["mfu"] < r["hfu"] < r["mfu"]
        assert r["peak_memory_gib"] > 0
        assert all(math.isfinite(loss) for loss in r["losses"])
    # the same batches: identical work per step, and (same init scale) similar initial losses
    assert results["megatron"]["model_flops_per_step"] == results["baseline"]["model_flops_per_step"]
    assert results["megatron"]["parameters"] == results["baseline"]["parameters"]
    assert report["ratio_tokens_per_s"] == pytest.approx(
        results["megatron"]["tokens_per_s_per_device"]
        / results["baseline"]["tokens_per_s_per_device"])
    for r in results.values():
        assert r["losses"][0] == pytest.approx(math.log(512), abs=0.2)
    assert "mfu" in report["formula"] and "flops.py" in report["formula"]["model_flops"]
    assert results["megatron"]["kernels"]["recompute"] == "off"
    assert "megatron kernels: attention torch SDPA" in format_report(report)


def test_a_trainer_that_fails_keeps_the_others_figures(tmp_path, monkeypatch):
    """On a GPU the baseline may run out of memory after megatron's figures are in: those are
    reported and written, the failure is named, and the tool exits 1."""
    from megatron_patch.benchmarking import throughput

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr(throughput, "baseline_runner", out_of_memory)
    out = tmp_path / "bench.json"
    argv = SMALL + ["--num-layers", "1", "--vision-num-layers", "1", "--warmup-steps", "0",
                    "--steps", "1", "--trainer", "both", "--json", str(out)]
    assert benchmark_main(argv) == 1
    report = json.loads(out.read_text())
    assert report["results"]["megatron"]["tokens_per_s_per_device"] > 0
    assert report["results"]["baseline"] == {
        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 GiB"}
    assert "ratio_tokens_per_s" not in report
    assert "baseline | failed: OutOfMemoryError" in format_report(report)


def test_mfu_is_not_available_without_a_peak_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    argv = SMALL + ["--num-layers", "1", "--vision-num-layers", "1", "--warmup-steps", "0",
                    "--steps", "1", "--trainer", "megatron", "--recompute-granularity", "full",
                    "--profile-dir", str(tmp_path / "profile"), "--memory-dir",
                    str(tmp_path / "memory"), "--json", str(out)]
    assert benchmark_main(argv) == 0
    report = json.loads(out.read_text())
    r = report["results"]["megatron"]
    assert r["mfu"] is None and r["hfu"] is None
    # the allocator history is CUDA's: on the CPU the step is not recorded, and says so
    assert r["memory"] == {"skipped": "the CUDA allocator's history needs a GPU"}
    assert "megatron memory: not recorded" in format_report(report)
    # the profiled step comes after the timed one and is not counted; on the CPU it lists the
    # operators (the linear layers' matmuls among them)
    assert len(r["step_times_s"]) == 1 and r["profile"]["wall_s"] > 0
    table = (tmp_path / "profile" / "megatron_profile.txt").read_text()
    assert table.startswith("megatron: profiled step") and "aten::mm" in table
    assert "sorted by self_cpu_time_total" in table and "self_device_time" not in table
    # full recompute: the hardware runs the layers' forward once more, not the output layer's,
    # patch embedding's or adapter's (under 4/3 of the model FLOPs; the exact count is
    # tests/test_training_flops.py's)
    model, hardware = r["model_tflops_per_s_per_device"], r["hardware_tflops_per_s_per_device"]
    assert model * 1.1 < hardware < model * 4 / 3


@pytest.mark.parametrize("overrides", [{}, {"num_query_groups": 1, "vision_hidden_size": 32,
                                            "ffn_hidden_size": 96, "num_layers": 3}])
def test_baseline_has_our_parameter_count_per_tower(overrides):
    from megatron_patch.training.parallel_setup import initialize, shutdown

    cfg = get_config("tiny", overrides)
    initialize(1, 1, 0)
    try:
        with torch.device("meta"):
            ours = count_parameters(build_model(cfg, attention_backend="local",
                                                use_cpu_initialization=True,
                                                perform_initialization=False))
    finally:
        shutdown()
    baseline = load_baseline()
    theirs = baseline.count_parameters(baseline.BaselineLlava(cfg))
    assert theirs == ours


def test_baseline_starts_near_uniform_and_learns_a_fixed_batch():
    baseline = load_baseline()
    cfg = get_config("tiny", {"init_method_std": 0.02})  # small init: near-uniform predictions
    batch = SyntheticPackedBatches(_spec(cfg)).take(1)
    trainer = baseline.BaselineTrainer(cfg, torch.device("cpu"), lr=3e-3, seed=0)
    losses = []
    for _ in range(6):
        pair = trainer.step(batch)
        losses.append(float(pair[0] / pair[1]))
    assert losses[0] == pytest.approx(math.log(cfg.language.vocab_size), abs=0.1)
    assert losses[-1] < losses[0] - 0.3


def test_baseline_attention_stays_inside_packed_samples():
    """Changing one packed sample must not change another sample's per-token losses."""
    baseline = load_baseline()
    cfg = get_config("tiny")
    batch = SyntheticPackedBatches(_spec(cfg, images_per_sample=1)).take(1)[0]
    cu = batch.cu_seqlens.tolist()
    assert len(cu) >= 3, "need at least two segments"
    torch.manual_seed(0)
    model = baseline.BaselineLlava(cfg).eval()
    inputs = dict(tokens=batch.tokens, labels=batch.labels, position_ids=batch.position_ids,
                  pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                  cu_seqlens=batch.cu_seqlens)
    with torch.no_grad():
        before = model(**inputs)
        tokens = batch.tokens.clone()
        text = (tokens[0, cu[1]:cu[2]] >= 16).nonzero().flatten() + cu[1]
        tokens[0, text[-1]] = 17 if tokens[0, text[-1]] != 17 else 18
        after = model(**dict(inputs, tokens=tokens))
    torch.testing.assert_close(after[0, :cu[1]], before[0, :cu[1]])
    assert not torch.allclose(after[0, cu[1]:cu[2]], before[0, cu[1]:cu[2]])


def test_synthetic_batches_are_valid_packs():
    cfg = get_config("tiny")
    spec = _spec(cfg)
    source = SyntheticPackedBatches(spec)
    batches = source.take(12)
    merge = cfg.vision.spatial_merge_size ** 2
    for b in batches:
        cu = b.cu_seqlens.tolist()
        segments = [e - s for s, e in zip(cu[:-1], cu[1:])]
        assert cu[0] == 0 and cu[-1] == b.tokens.numel() == spec.seq_length
        assert all(n > 0 for n in segments) and b.max_seqlen == max(segments)
        # real samples fill the front, the padding tail is one extra segment
        pad = spec.seq_length - b.real_tokens
        assert len(segments) == b.num_samples + (1 if pad else 0)
        assert sum(segments[:b.num_samples]) == b.real_tokens
        # positions restart at every segment
        starts = b.position_ids[0, torch.tensor(cu[:-1])]
        assert starts.tolist() == [0] * len(segments)
        # image tokens == merged patches, pixel rows == patches
        patches = int(b.image_grid_thw.prod(dim=1).sum())
        assert b.pixel_values.shape == (patches, cfg.vision.patch_dim)
        assert int((b.tokens == cfg.image_token_id).sum()) == patches // merge
        assert b.num_images == b.image_grid_thw.shape[0] <= spec.max_images_per_pack
        assert b.num_images == 2 * b.num_samples
        # loss on answers only, never on image tokens or padding
        assert b.loss_mask.sum() > 0
        assert float(b.loss_mask[b.tokens == cfg.image_token_id].sum()) == 0
        assert float(b.loss_mask[0, b.real_tokens:].sum()) == 0
        for start, end in zip(cu[:b.num_samples], cu[1:b.num_samples + 1]):
            # labels: the next token of the same sample; none past its end
            assert torch.equal(b.labels[0, start:end - 1], b.tokens[0, start + 1:end])
            assert float(b.loss_mask[0, end - 1]) == 0
    keys = [key for b in batches for key in b.__key__]
    assert len(keys) == len(set(keys)) == sum(b.num_samples for b in batches)
    # deterministic for a seed
    again = SyntheticPackedBatches(spec).take(12)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(batches, again))


def test_synthetic_lengths_are_long_tailed():
    cfg = get_config("tiny")
    source = SyntheticPackedBatches(_spec(cfg, images_per_sample=0, text_length_median=200))
    lengths = sorted(source.make_sample().length for _ in range(400))
    median, p95 = lengths[200], lengths[380]
    assert 150 < median < 250
    assert p95 > 2.5 * median  # lognormal sigma 0.9: p95 is ~4.4x the median


def test_real_data_through_the_trainer_loader(converted_demo, demo_tokenizer, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--num-layers", "1", "--vision-num-layers", "1",
            "--seq-length", "256", "--data-path", str(converted_demo),
            "--tokenizer-path", demo_tokenizer, "--num-workers", "0", "--warmup-steps", "0",
            "--steps", "2", "--trainer", "both", "--json", str(out)]
    assert benchmark_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["same_batches"] is True  # each trainer's fresh loader replays the same data
    for r in report["results"].values():
        assert r["tokens_per_s_per_device"] > 0 and 0.0 <= r["data_wait_fraction"] <= 1.0
        assert r["samples_per_step"] > 1  # packed: several demo conversations per sequence


def test_baseline_computes_our_model_given_the_same_weights():
    """Same architecture, not just the same parameter count: megatron's tiny model, exported to
    HF names, loaded into the baseline gives the same per-token losses on a packed batch."""
    from megatron_patch.model.hf_mapping import mcore_to_hf
    from megatron_patch.training.parallel_setup import initialize, shutdown
    from megatron_patch.training.train_step import model_inputs

    baseline = load_baseline()
    cfg = get_config("tiny", {"init_method_std": 0.02})  # the scaling below assumes this init
    batch = SyntheticPackedBatches(_spec(cfg)).take(1)[0]
    initialize(1, 1, 0)
    try:
        ours = build_model(cfg, attention_backend="local", use_cpu_initialization=True).eval()
        with torch.no_grad():  # non-trivial norms and biases, so every tensor matters
            for name, p in ours.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
                elif "linear_qkv" in name or "output_layer" in name:
                    p.mul_(20.0)  # peaked attention (positions matter) and spread-out losses
            inputs = model_inputs(batch, torch.device("cpu"))
            inputs.pop("loss_mask")
            expected = ours(**inputs)
            expected_features = ours.image_features(batch.pixel_values, batch.image_grid_thw)
        state = {k: v for k, v in ours.state_dict().items() if "_extra_state" not in k}
        hf_state = mcore_to_hf(state, cfg)
    finally:
        shutdown()
    model = baseline.BaselineLlava(cfg).eval()
    baseline.load_hf_state_dict(model, hf_state)
    with torch.no_grad():
        features = model.visual(batch.pixel_values, batch.image_grid_thw)
        got = model(batch.tokens, batch.labels, batch.position_ids, batch.pixel_values,
                    batch.image_grid_thw, batch.cu_seqlens)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-5)
    assert got.shape == expected.shape and float(expected.std()) > 0.5
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def _packed_attention_report(tmp_path, seq_length: int, repeats: int, *extra: str) -> dict:
    """benchmarks/bench_packed_attention.py on the CPU at small sizes: its JSON report."""
    out = tmp_path / "attention.json"
    assert load_benchmark("bench_packed_attention").main(
        ["--device", "cpu", "--dtype", "float32", "--seq-length", str(seq_length), "--heads", "4",
         "--groups", "2", "--head-dim", "16", "--repeats", str(repeats), "--json", str(out),
         *extra]) == 0
    return json.loads(out.read_text())


def test_packed_attention_benchmark_times_a_typical_pack(tmp_path):
    """benchmarks/bench_packed_attention.py on CPU: the loop is timed on a pack of the
    long-tailed mix that fills the sequence (padding last); the varlen kernel needs CUDA."""
    from megatron_patch.model import attention
    kernel_getter = attention.flash_varlen_kernel
    report = _packed_attention_report(tmp_path, 1024, 2)
    lengths = report["segment_lengths"]
    assert sum(lengths) == 1024 and report["segments"] == len(lengths) > 1
    assert report["loop_ms"] > 0 and report["varlen_ms"] is None
    assert attention.flash_varlen_kernel is kernel_getter  # the benchmark put it back


def test_packed_attention_benchmark_runs_each_kernel_path(tmp_path, monkeypatch):
    """The GPU paths with the varlen kernel played by a stand-in (tests/test_model_attention.py):
    exact segments and the CUDA graphs' fixed segments give the loop's result; the cuDNN
    kernel, which has no CPU implementation, is reported as failed instead of stopping the
    run."""
    from megatron_patch.model import attention
    from megatron_patch.training.flops import attention_forward_flops
    from test_model_attention import KernelLater
    monkeypatch.setattr(attention, "flash_varlen_kernel", lambda: KernelLater())
    monkeypatch.setattr(attention.SDPACoreAttention, "flash_varlen_applies", lambda *args: True)
    report = _packed_attention_report(tmp_path, 512, 1, "--variants")
    assert report["varlen_ms"] > 0 and report["varlen_fixed_segments_ms"] > 0
    assert report["varlen_max_abs_difference"] < 1e-5
    assert report["varlen_fixed_segments_max_abs_difference"] < 1e-5
    assert set(report["failed"]) == {"cudnn"} and "cudnn_ms" not in report
    # TFLOP/s: the MFU formula's attention FLOPs (3 x forward) over each path's time
    forward = attention_forward_flops(report["segment_lengths"], 4 * 16, causal=True)
    assert report["varlen_tflops"] == pytest.approx(3 * forward / report["varlen_ms"] / 1e9)
    # the other layouts on the same segments, the kernels only
    layouts = report["variants"]
    assert set(layouts) == {"not causal", "no grouped KV heads", "vision layout"}
    assert (layouts["not causal"]["causal"], layouts["no grouped KV heads"]["groups"]) == (False, 4)
    assert layouts["vision layout"]["head_dim"] == 64
    for layout in layouts.values():
        assert layout["varlen_ms"] > 0 and "loop_ms" not in layout
        assert set(layout["failed"]) == {"cudnn"}
        forward = attention_forward_flops(report["segment_lengths"],
                                          layout["heads"] * layout["head_dim"], layout["causal"])
        assert layout["varlen_tflops"] == pytest.approx(3 * forward / layout["varlen_ms"] / 1e9)


def test_activation_memory_benchmark_shows_what_sequence_parallelism_saves(tmp_path):
    """benchmarks/bench_activation_memory.py under torchrun (TP=2): the bytes autograd keeps
    per decoder layer shrink with TP and, with --sequence-parallel, to half of TP=1's (every
    activation of a layer is then split over the 2 ranks)."""
    from trainer_runs import REPO, run_process_group, subprocess_env
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "benchmarks" / "bench_activation_memory.py"), "--seq-length", "512",
               "--top", "3", "--json", str(out)]
    result = run_process_group(command, dict(subprocess_env(), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TP=2 + SP" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    tp1, tp2, sp = [row["decoder_per_layer"] for row in rows]
    assert tp1 > tp2 > sp == pytest.approx(tp1 / 2, rel=0.02)
    # --top: the largest single activation is the loss's fp32 softmax over the vocabulary,
    # one row per token, saved by megatron's cross entropy (TP=1 only)
    largest = rows[0]["largest"]
    assert [entry["bytes"] for entry in largest] == sorted((e["bytes"] for e in largest),
                                                           reverse=True) and len(largest) == 3
    tokens, _, vocab = largest[0]["shape"]
    assert tokens == 512 and largest[0]["bytes"] == tokens * vocab * 4
    assert largest[0]["dtype"] == "torch.float32" and largest[0]["region"] == "other"
    assert largest[0]["saved_by"].startswith("cross_entropy.py:")
    assert "largest" not in rows[1] and "cross_entropy.py" in result.stdout


def test_chunked_loss_keeps_half_the_bytes_of_megatrons_softmax_for_the_backward(tmp_path):
    """bench_activation_memory.py with --loss-chunk-tokens (one process, TP=1, bf16, every token
    in the loss): megatron's cross entropy keeps the fp32 softmax (tokens x vocab x 4 bytes),
    the largest tensor the forward saves; the chunked loss keeps the bf16 gradient of the logits
    instead (2 bytes), in pieces of one chunk; the decoder layers save the same as before."""
    from megatron_patch.model import get_config
    bench = load_benchmark("bench_activation_memory")
    rows = {}
    for chunk_tokens in (0, 128):
        out = tmp_path / f"memory_{chunk_tokens}.json"
        bench.main(["--seq-length", "384", "--bf16", "--top", "8", "--loss-chunk-tokens",
                    str(chunk_tokens), "--json", str(out)])
        rows[chunk_tokens] = json.loads(out.read_text())["rows"][0]
    vocab = get_config("tiny").language.vocab_size
    megatron, chunked = rows[0], rows[128]
    assert [384, 1, vocab] in [entry["shape"] for entry in megatron["largest"]]
    kept = [entry for entry in chunked["largest"] if vocab in entry["shape"]]
    assert [entry["shape"] for entry in kept] == [[128, vocab]] * 3
    assert all(entry["bytes"] == 128 * vocab * 2 for entry in kept)
    assert chunked["decoder_per_layer"] == megatron["decoder_per_layer"]
    # the softmax's 4 bytes become 2; the chunked loss also keeps a few [tokens] vectors
    assert megatron["other"] - chunked["other"] >= 384 * vocab * (4 - 2) - 384 * 32


def test_activation_memory_estimate_for_a_deeper_model_equals_measuring_it(tmp_path):
    """bench_activation_memory.py --gpu-paths --estimate-for-depth: measured with one layer per
    tower, the activations of a 3 + 3 layer model are what measuring that model gives, and its
    states are 18 bytes (bf16 weight, fp32 gradient, master weight and two moments) per
    parameter of that model. The GPU's paths keep less than the CPU's: the compiled SwiGLU keeps
    its input only, and the chunked loss (the GPU default) no logits."""
    from megatron_patch.model import build_model, count_parameters, get_config
    from megatron_patch.training.parallel_setup import initialize, shutdown
    bench = load_benchmark("bench_activation_memory")
    common = ["--seq-length", "384", "--bf16", "--num-layers", "1", "--vision-num-layers", "1"]
    reports = {}
    for name, extra in (("estimate", ["--gpu-paths", "--estimate-for-depth", "3", "3"]),
                        ("deep", ["--gpu-paths", "--num-layers", "3", "--vision-num-layers", "3"]),
                        ("cpu", [])):
        bench.main(common + extra + ["--json", str(tmp_path / f"{name}.json")])
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    estimate, deep = reports["estimate"]["estimate"], reports["deep"]["rows"][0]
    assert estimate["activations"] == pytest.approx(
        3 * deep["decoder_per_layer"] + deep["other"], rel=1e-12)
    assert estimate["language_per_layer"] > 0 and estimate["vision_per_layer"] > 0
    initialize(1, 1, 1234)
    try:
        model = build_model(get_config("tiny", dict(num_layers=3, vision_num_layers=3)),
                            attention_backend="local", use_cpu_initialization=True)
        parameters = count_parameters(model)["total"]
    finally:
        shutdown()
    assert estimate["parameters"] == parameters and estimate["states"] == 18 * parameters
    assert estimate["total"] == estimate["states"] + estimate["activations"]
    gpu, cpu = reports["estimate"]["rows"][0], reports["cpu"]["rows"][0]
    assert gpu["decoder_per_layer"] < cpu["decoder_per_layer"] and gpu["other"] < cpu["other"]
    assert reports["cpu"]["estimate"] is None


def test_checkpoint_save_benchmark_publishes_every_mode(tmp_path):
    """benchmarks/bench_checkpoint_save.py under torchrun (DP=2): each mode leaves a complete
    checkpoint of the same size; the async save is published only after the loop trained on;
    the default splits the writes over both replicas, sync-first-replica leaves them to rank 0.
    The third save with a constant structure (reusing the plan and the split of the writes)
    holds what a plain save of the same state holds."""
    from trainer_runs import REPO, checkpoint_tensors, run_process_group, subprocess_env
    from test_training_distributed_optimizer import data_parallel_write_shares
    from megatron_patch.training import checkpoint_paths
    out, save_dir = tmp_path / "save.json", tmp_path / "checkpoints"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "benchmarks" / "bench_checkpoint_save.py"), "--save-dir", str(save_dir),
               "--seq-length", "256", "--steps", "1", "--saves", "3", "--keep",
               "--json", str(out)]
    result = run_process_group(command, dict(subprocess_env(), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["sync", "sync-constant-structure", "async", "sync-first-replica"]
    sizes = [row["checkpoint_bytes"] for row in rows.values()]
    assert min(sizes) > 0.9 * max(sizes)
    assert rows["async"]["steps_while_writing"] >= 1
    assert rows["async"]["published_s"] > rows["async"]["blocked_s"]
    shares, directories = {}, {}
    for mode, row in rows.items():
        (iteration,) = checkpoint_paths.complete_iterations(str(save_dir / mode))
        directories[mode] = save_dir / mode / checkpoint_paths.iteration_dir_name(iteration)
        shares[mode] = data_parallel_write_shares(directories[mode])
    assert sorted(shares["sync"]) == sorted(shares["async"]) == [0, 1]
    assert sorted(shares["sync-constant-structure"]) == [0, 1]
    assert sorted(shares["sync-first-replica"]) == [0]
    plain, constant = (checkpoint_tensors(directories[mode])
                       for mode in ("sync", "sync-constant-structure"))  # no step in between
    assert sorted(constant) == sorted(plain) and any(k.startswith("optimizer.") for k in plain)
    assert all(torch.equal(constant[key], value) for key, value in plain.items())


def test_host_syncs_are_put_on_the_line_that_caused_them():
    """--profile-dir's sync count names the innermost line outside torch, the warnings
    machinery and the profiler (torch's sync debug mode warns from inside torch's calls);
    on the CPU there is nothing to count."""
    from traceback import FrameSummary

    from megatron_patch.benchmarking import profiling
    stack = [FrameSummary("/repo/megatron_patch/training/trainer.py", 200, "train"),
             FrameSummary("/repo/megatron_patch/model/llava_ov.py", 92, "embed"),
             FrameSummary("/venv/site-packages/torch/_tensor.py", 1100, "__int__"),
             FrameSummary("/usr/lib/python3.11/warnings.py", 110, "_showwarnmsg"),
             FrameSummary(profiling.__file__, 70, "show")]
    assert profiling.sync_site(stack) == "llava_ov.py:92 embed"
    assert profiling.sync_site(stack[2:]) == "inside torch"
    with profiling.counting_syncs(torch.device("cpu")) as syncs:
        assert syncs is None


def test_profile_summary_merges_kernel_intervals_and_sorts_them_by_kind():
    """The GPU side of --profile-dir on recorded events: busy time is the union of the kernels'
    intervals (overlapping streams are not counted twice), kernel time is split by name."""
    from types import SimpleNamespace

    from megatron_patch.benchmarking import profiling, throughput

    def kernel(name, start, end, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [kernel("nvjet_sm90_tst_256x128", 0, 400),
              kernel("pytorch_flash::flash_fwd_kernel", 300, 500),  # overlaps the matmul
              kernel("vectorized_elementwise_kernel<add>", 700, 800),
              kernel("multi_tensor_apply_kernel<Adam>", 800, 900),
              kernel("aten::mm", 0, 2000, torch.autograd.DeviceType.CPU)]  # host op: ignored
    summary = profiling._kernel_summary(SimpleNamespace(events=lambda: events), wall_us=1000.0)
    assert summary["kernels"] == 4
    assert summary["device_busy_s"] == pytest.approx(700e-6)  # [0, 500] + [700, 900]
    assert summary["device_busy_fraction"] == pytest.approx(0.7)
    assert summary["kernel_seconds_by_category"] == pytest.approx(
        {"matmul": 400e-6, "attention": 200e-6, "other": 100e-6, "optimizer": 100e-6})
    line = throughput._profile_line({**summary, "kernels_per_micro_batch": 2.0})
    assert "device busy 70.0%, 2 kernels per micro-batch; kernel s: matmul 0.000" in line
    line = throughput._profile_line({**summary, "kernels_per_micro_batch": 2.0, "host_syncs": 3})
    assert line.endswith("; 3 host syncs")
    assert profiling.categorise("CatArrayBatchedCopy") == "copy"
    assert profiling.categorise("scatter_gather_elementwise_kernel") == "other"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (`pytest -m gpu`)")
def test_a_profiled_cuda_step_counts_its_host_syncs_by_line(tmp_path):
    """Two reads of a CUDA value back to the host (``.item()``, a boolean-mask index) are
    counted at their lines; launching alone is not."""
    from megatron_patch.benchmarking import profiling
    x = torch.arange(8.0, device="cuda")

    def step():
        (x * 2).sum().item()  # one sync here
        x[x > 3].sum()  # the mask's nonzero: another
        torch.cumsum(x, 0)  # no sync

    summary = profiling.profile_step(step, torch.device("cuda"), "toy", str(tmp_path))
    assert summary["host_syncs"] >= 2
    sites = summary["host_syncs_by_site"]
    assert all(site.startswith("test_benchmark_throughput.py:") for site in sites), sites
    assert "host syncs in the step" in (tmp_path / "toy_profile.txt").read_text()


def test_step_budget_splits_the_mfu_formulas_flops_and_times_them():
    """bench_step_budget: the step's FLOPs are the MFU formula's (interval_stats.batch_flops);
    with megatron's loss the hardware runs the model FLOPs less the patch embedding's input
    gradient, the chunked loss lowers only the matmuls'; the seconds at given rates add up to
    the step the target MFU allows."""
    bench = load_benchmark("bench_step_budget")
    args = bench.parse_args(["--model", "tiny", "--num-layers", "2", "--hidden-size", "64",
                             "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                             "--num-query-groups", "2", "--seq-length", "512", "--steps", "1",
                             "--micro-batches", "3", "--image-size-min", "56",
                             "--image-size-max", "112"])
    chunked = bench.step_flops(args)
    whole = bench.step_flops(bench.argparse.Namespace(**{**vars(args), "no_loss_chunks": True}))
    assert chunked["model"] == whole["model"] and chunked["as_profiled"] == whole["hardware"]
    assert 0.99 * whole["model"] < whole["hardware"] < whole["model"]
    assert 0 < chunked["attention"] == whole["attention"] < chunked["hardware"] < whole["hardware"]
    seconds = bench.budget(chunked, matmul_rate=2e12, attention_rate=1e12, mfu=0.5, peak=8e12)
    assert seconds["allowed"] == pytest.approx(chunked["model"] / 4e12)
    assert seconds["attention"] == pytest.approx(chunked["attention"] / 1e12)
    assert seconds["matmul"] == pytest.approx((chunked["hardware"] - chunked["attention"]) / 2e12)
    assert seconds["rest"] == pytest.approx(seconds["allowed"] - seconds["matmul"]
                                            - seconds["attention"])

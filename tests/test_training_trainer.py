"""The trainer end to end on the demo data (tiny model, CPU, gloo): loss goes down, per-module
learning rates reach TensorBoard, frozen weights stay put, a NaN step is skipped, resume is
exact to the last bit (a changed schedule is named), and TP=2 / PP=2 runs continue a TP=1 checkpoint with the same losses.

Each run is a subprocess (`python train/pretrain_llava_ov.py` or torchrun), as users launch it.
"""
import argparse
import json
import math

import pytest
import torch

from megatron_patch.training.optimizer import build_scheduler, schedule_kept_from_checkpoint
from trainer_runs import (EVAL_ALL_AT_8, RESUME_ARGS, evaluations, metrics, model_tensors,
                          run_trainer, tensorboard_scalars)

# ------------------------------------------------------------------ training behaviour
@pytest.fixture(scope="module")
def adapter_run(converted_demo, demo_tokenizer, tmp_path_factory):
    """24 iterations, vision tower frozen, adapter at 5x the LR, a NaN injected at iteration 6."""
    save = tmp_path_factory.mktemp("adapter_run") / "run"
    result = run_trainer(converted_demo, demo_tokenizer, save, "--train-iters", 24,
                         "--trainable-modules", "adapter", "language_model", "--lr-adapter", "5e-3",
                         "--save-interval", 12, "--eval-interval", 12, "--eval-iters", 2,
                         "--debug-nan-at-iteration", 6)
    return save, result


def test_loss_decreases(adapter_run):
    save, _ = adapter_run
    losses = [metrics(save)[i]["train/loss"] for i in range(1, 25) if i != 6]
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 1.0, (first, last)  # measured: 6.11 -> 4.79


def test_nan_step_is_skipped_and_counted(adapter_run):
    save, result = adapter_run
    records = metrics(save)
    assert [records[i]["train/skipped_steps"] for i in (5, 6, 7, 24)] == [0, 1, 1, 1]
    assert math.isnan(records[6]["train/loss"]) and math.isfinite(records[7]["train/loss"])
    assert "iteration 6: gradient norm nan, step skipped" in result.stdout + result.stderr


def test_per_module_learning_rates_in_tensorboard(adapter_run):
    save, _ = adapter_run
    scalars = tensorboard_scalars(save / "tensorboard")
    adapter, language = scalars["lr/adapter"], scalars["lr/language_model"]
    assert "lr/vision_model" not in scalars  # frozen: no param group
    assert set(adapter) == set(range(1, 25))
    for step in adapter:
        assert adapter[step] == pytest.approx(5 * language[step], rel=1e-6)
    assert language[2] == pytest.approx(1e-3, rel=1e-6)  # end of warmup: the peak lr
    assert language[24] < language[12] < language[2]      # cosine decay
    for tag in ("train/loss", "train/grad_norm", "throughput/tokens_per_sec",
                "throughput/samples_per_sec_per_device", "data/packing_efficiency",
                "memory/peak_gib", "time/data_wait_sec", "time/forward_backward_sec",
                "time/optimizer_sec", "time/gc_sec", "gc/collections", "eval/loss"):
        assert tag in scalars, tag
    assert set(scalars["eval/loss"]) == {12, 24}


def test_frozen_modules_do_not_change(adapter_run):
    save, _ = adapter_run
    middle, end = model_tensors(save / "iter_0000012"), model_tensors(save / "iter_0000024")
    vision = [key for key in end if key.startswith("vision_model.")]
    adapter = [key for key in end if key.startswith("adapter.")]
    assert vision and adapter
    assert all(torch.equal(middle[key], end[key]) for key in vision)
    assert not all(torch.equal(middle[key], end[key]) for key in adapter)


def test_console_line_and_run_files(adapter_run):
    save, result = adapter_run
    assert "iter 24/24 | loss" in result.stdout and "ETA" in result.stdout
    logs = list(save.glob("run_*.log"))
    assert logs and "iter 24/24 | loss" in logs[0].read_text()
    config = json.loads((save / "run_config.json").read_text())
    assert config["args"]["lr_adapter"] == 5e-3 and config["model"]["name"] == "tiny"
    assert config["kernels"]["attention"] == "torch SDPA; packed sequences: one call per sample"
    assert config["kernels"]["fused_cross_entropy"] is False  # fp32 on CPU


def test_consecutive_nan_steps_stop_the_run(converted_demo, demo_tokenizer, tmp_path):
    result = run_trainer(converted_demo, demo_tokenizer, tmp_path / "run", "--train-iters", 3,
                         "--debug-nan-at-iteration", 2, "--max-consecutive-skips", 1, check=False)
    assert result.returncode != 0
    assert "rank 0 failed: TooManySkippedSteps" in result.stdout + result.stderr
    assert "1 steps in a row had a NaN/inf gradient norm" in result.stdout + result.stderr


def test_manual_gc_collects_only_at_the_chosen_iterations(adapter_run, converted_demo,
                                                          demo_tokenizer, tmp_path):
    """--manual-gc: no automatic collection in the loop; collections after every 3rd iteration
    and around the evaluation after iteration 4 (logged with iteration 5). One loader worker
    keeps energon's own collections (every 10 batches, in the process that reads) out of the
    trainer's process, as in GPU runs."""
    save = tmp_path / "run"
    run_trainer(converted_demo, demo_tokenizer, save, "--train-iters", 8, "--num-workers", 1,
                "--manual-gc", "--manual-gc-interval", 3, "--eval-interval", 4, "--eval-iters", 1)
    collections = {i: record["gc/collections"] for i, record in metrics(save).items()}
    assert collections[3] >= 1 and collections[6] >= 1
    assert collections[5] >= 2  # before and after the evaluation
    assert all(collections[i] == 0 for i in (1, 2, 4, 7, 8)), collections
    # the automatic collector (the adapter run) collects in those iterations too
    automatic = metrics(adapter_run[0])
    assert sum(automatic[i]["gc/collections"] for i in (1, 2, 4, 7, 8)) > 0


def test_overlapped_grad_reduce_trains_steps_whose_last_micro_batch_has_no_image(
        demo_data, demo_tokenizer, tmp_path):
    """megatron's --overlap-grad-reduce reduces each bucket once all its gradients are in, in
    a step's last micro-batch: a text-only one (common in SFT mixes) used to leave the vision
    tower's never coming (an AssertionError at the next step). Same losses as without it."""
    from megatron_patch.data.convert_cli import main as convert_main
    records = json.loads((demo_data / "demo.json").read_text())
    text = [r for r in records if not (r.get("image") or r.get("images"))][:3]
    images = [r for r in records if r.get("image") or r.get("images")][:3]
    pairs = [record for pair in zip(images, text) for record in pair]  # each step: image, text
    (tmp_path / "mix.json").write_text(json.dumps(pairs))
    data = tmp_path / "mix"
    assert convert_main([str(tmp_path / "mix.json"), "--image-root", str(demo_data), "--output-dir",
                         str(data), "--split", "100,0", "--workers", "1", "--no-progress"]) == 0
    runs = {}
    for name, extra in (("plain", ()), ("overlapped", ("--overlap-grad-reduce",))):
        run_trainer(data, demo_tokenizer, tmp_path / name, "--train-iters", 3,
                    "--micro-batch-size", 1, "--global-batch-size", 2, "--lr-warmup-iters", 1,
                    "--shuffle-buffer-size", 1, *extra)
        runs[name] = metrics(tmp_path / name)
    assert sorted(runs["overlapped"]) == [1, 2, 3]
    assert all(runs["overlapped"][i]["train/loss"] == runs["plain"][i]["train/loss"] for i in (1, 2, 3))


# ------------------------------------------------------------------ resume and resharding
def test_resume_is_exact(reference_run, converted_demo, demo_tokenizer, tmp_path):
    save = tmp_path / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *RESUME_ARGS, "--exit-interval", 4,
                "--keep-last", 1)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (save / "iter_0000004" / "dataloader" / "dp_rank_0000.pt").is_file()
    assert (save / "dataloader" / "train_dataloader_dprank000.pt").is_file()
    assert 5 not in metrics(save)

    result = run_trainer(converted_demo, demo_tokenizer, save, *RESUME_ARGS, "--load", save,
                         "--keep-last", 1)
    assert "resuming keeps the learning-rate schedule" not in result.stdout + result.stderr
    resumed, reference = metrics(save), metrics(reference_run)
    for iteration in range(1, 9):
        for key in ("train/loss", "train/grad_norm", "lr/language_model",
                    "data/packing_efficiency"):
            assert resumed[iteration][key] == reference[iteration][key], (iteration, key)
    final, expected = model_tensors(save / "iter_0000008"), model_tensors(reference_run / "iter_0000008")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in final)
    assert not (save / "iter_0000004").exists()  # --keep-last 1 removed it after iter 8 was safe


def test_a_resume_names_the_saved_schedule_it_keeps_over_the_one_asked_for():
    """megatron's scheduler takes the checkpoint's values; a larger --train-iters would decay
    nothing further and train the extra iterations at --min-lr."""
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, lr_warmup_iters=2, lr_decay_iters=8,
                              lr_decay_style="cosine", weight_decay=0.0, train_iters=8,
                              global_batch_size=4)

    def scheduler(namespace):
        return build_scheduler(namespace, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]))

    saved = scheduler(args).state_dict()
    same = scheduler(args)
    same.load_state_dict(saved)
    assert schedule_kept_from_checkpoint(same, args) == []
    longer = argparse.Namespace(**{**vars(args), "train_iters": 12, "lr_decay_iters": 12})
    resumed = scheduler(longer)
    resumed.load_state_dict(saved)
    assert schedule_kept_from_checkpoint(resumed, longer) == [
        "--lr-decay-iters 8 (this run asks for 12)"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", 2, "--sequence-parallel"),
                                    ("--pipeline-model-parallel-size", 2)],
                         ids=["tp2-sequence-parallel", "pp2"])
def test_parallel_run_continues_a_single_process_checkpoint(layout, reference_run, converted_demo,
                                                            demo_tokenizer, tmp_path):
    """A TP=2 run with sequence parallelism (a superset of plain TP's code path; plain TP=2 is
    compared with TP=1 in tests/test_model_parallel.py) or a PP=2 run loads the TP=1
    iteration-4 checkpoint (dist-checkpoint reshards model and optimizer) and trains
    iterations 5-8 with the reference's losses: megatron's finalize_model_grads sums the
    sequence-parallel norms' and the q/k norms' gradients over the TP ranks. The evaluation
    after iteration 8 scores the whole val split (its last global batch is partial) as the
    reference's does."""
    save = tmp_path / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *RESUME_ARGS, *layout, *EVAL_ALL_AT_8,
                "--load", reference_run / "iter_0000004", nproc=2)
    kernels = json.loads((save / "run_config.json").read_text())["kernels"]
    assert kernels["sequence_parallel"] == ("--sequence-parallel" in layout)
    resumed, reference = metrics(save), metrics(reference_run)
    assert sorted(resumed) == [5, 6, 7, 8]
    for iteration in range(5, 9):
        assert resumed[iteration]["train/loss"] == pytest.approx(
            reference[iteration]["train/loss"], rel=1e-5, abs=1e-6), iteration
        assert resumed[iteration]["train/grad_norm"] == pytest.approx(
            reference[iteration]["train/grad_norm"], rel=1e-4), iteration
    (loss, tokens), expected = evaluations(save)[8], evaluations(reference_run)[8]
    assert tokens == expected[1] and loss == pytest.approx(expected[0], rel=1e-5)


@pytest.mark.parametrize("source", ["base model", "earlier stage"])
def test_weights_only_load_starts_fresh(source, reference_run, converted_demo, demo_tokenizer,
                                        tmp_path):
    """A checkpoint without run state (what the HF converter writes), or a run loaded with
    --finetune (an earlier training stage), gives weights only: the run starts at iteration 0
    with a fresh optimizer and data order, from the trained weights. The base model is loaded
    by the GPU recipe (bf16, distributed optimizer), whose fp32 master weights are made before
    the load: they must be refreshed, or the first step writes the initial weights back."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(reference_run / "iter_0000004", base / "iter_0000004")
    if source == "base model":
        (base / "iter_0000004" / "run_state.json").unlink()
        flags, note = ("--bf16", "--use-distributed-optimizer", "--lr", "1e-9", "--min-lr", "1e-9"), \
            "a base model; starting at iteration 0"
    else:  # without --finetune this checkpoint would resume at iteration 5 (test_resume_is_exact)
        flags, note = ("--finetune",), "weights only (--finetune); starting at iteration 0"
    save = tmp_path / "run"
    result = run_trainer(converted_demo, demo_tokenizer, save, *RESUME_ARGS[2:], "--train-iters", 1,
                         "--lr-warmup-iters", 0, "--load", base, *flags)
    assert note in result.stdout
    fresh, reference = metrics(save), metrics(reference_run)
    assert sorted(fresh) == [1]
    # the same first batch as the reference's iteration 1, seen by weights trained 4 steps
    assert fresh[1]["data/packing_efficiency"] == reference[1]["data/packing_efficiency"]
    assert fresh[1]["train/loss"] < reference[1]["train/loss"] - 0.1
    if source == "base model":
        loaded, stepped = model_tensors(base / "iter_0000004"), model_tensors(save / "iter_0000001")
        assert loaded.keys() == stepped.keys()
        for key, value in loaded.items():  # a step of lr 1e-9: the loaded weights, in bf16
            torch.testing.assert_close(stepped[key], value.bfloat16(), rtol=0, atol=1e-7,
                                       msg=lambda detail, key=key: f"{key}: {detail}")

"""The launcher's GBS/NSTEP arithmetic, table-driven, and reading sample counts from .nv-meta."""
import json

import pytest

from megatron_patch.training.run_plan import count_train_samples, main, plan_run


@pytest.mark.parametrize("samples,world,tp,pp,mbs,gbs,expect_gbs,expect_steps", [
    (100_000, 8, 1, 1, 1, 32, 32, 3282),    # the user guide: 3125 steps, +5% margin
    (100_000, 8, 2, 1, 1, 32, 32, 3282),    # DP 4
    (100_000, 8, 1, 1, 2, 30, 32, 3282),    # 30 is not a multiple of 2 x 8: rounded to 32
    (1_000, 8, 2, 2, 1, None, 8, 132),      # default GBS = 4 x DP(2) = 8: 125 steps -> 132
    (10, 1, 1, 1, 1, None, 4, 4),           # laptop: 3 steps, x 1.05 = 3.15 -> 4
])
def test_plan_table(samples, world, tp, pp, mbs, gbs, expect_gbs, expect_steps):
    plan = plan_run(samples, world, tp, pp, mbs, gbs)
    assert plan.global_batch_size == expect_gbs
    assert plan.global_batch_size % (mbs * plan.data_parallel_size) == 0
    assert plan.train_iters == expect_steps
    assert (gbs is not None and gbs != expect_gbs) == bool(plan.notes)


def test_epochs_warmup_and_save_interval():
    plan = plan_run(100_000, 8, global_batch=32, epochs=2, warmup_fraction=0.01, saves_per_run=10)
    assert plan.train_iters == 6563 and plan.warmup_iters == 66 and plan.save_interval == 657


def test_tp_pp_must_divide_world():
    with pytest.raises(ValueError, match="does not divide"):
        plan_run(100, 6, tp=4)


def test_counts_from_manifest_energon_index_and_blend(tmp_path, capsys):
    a = tmp_path / "a" / ".nv-meta"
    a.mkdir(parents=True)
    (a / "llava_manifest.json").write_text(json.dumps({"samples": {"train": 90, "val": 10}}))
    b = tmp_path / "b" / ".nv-meta"
    b.mkdir(parents=True)
    (b / ".info.json").write_text(json.dumps({"shard_counts": {"s-00000.tar": 5, "s-00001.tar": 7,
                                                               "s-00002.tar": 100}}))
    (b / "split.yaml").write_text("split_parts:\n  train: ['s-{00000..00001}.tar']\n  val: [s-00002.tar]\n")
    assert count_train_samples(str(tmp_path / "a")) == 90
    assert count_train_samples(str(tmp_path / "b")) == 12
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
                     "    blend:\n      - weight: 3\n        path: ./a\n      - weight: 1\n        path: ./b\n")
    assert count_train_samples(str(blend)) == 102
    assert main(["--data-path", str(tmp_path / "a"), "--world-size", "2", "--gbs", "8"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["SAMPLES"] == "90" and lines["GBS"] == "8" and lines["NSTEP"] == "13"
    assert main(["--data-path", str(tmp_path / "missing"), "--world-size", "1"]) == 1
    assert "no .nv-meta" in capsys.readouterr().out
    assert main(["--data-path", str(tmp_path / "a"), "--world-size", "1", "--epochs", "0"]) == 1
    assert "PLAN_ERROR=EPOCHS must be positive, got 0.0" in capsys.readouterr().out


# ------------------------------------------------------------------ packing
def test_packed_sequences_divide_the_steps():
    plain = plan_run(100_000, 8, global_batch=32, margin=0)
    packed = plan_run(100_000, 8, global_batch=32, margin=0, samples_per_sequence=10)
    assert (plain.train_iters, packed.train_iters) == (3125, 313)
    assert any("~10.00 samples per sequence" in note and "~320 samples" in note
               for note in packed.notes)


def test_packing_estimate_packs_like_the_trainer():
    from megatron_patch.training.packing_estimate import estimate_packing
    # 100-token samples in 1000-token sequences: 10 per sequence, all full
    assert estimate_packing([(100, 1)] * 200, 1000, 64, 100).samples_per_sequence == 10
    # packs are planned buffer by buffer: 64 samples make 6 full packs and one of 4
    assert estimate_packing([(100, 1)] * 64, 1000, 64, 64).samples_per_sequence == 64 / 7
    # the image cap binds first: 4 images per sequence
    capped = estimate_packing([(100, 1)] * 200, 1000, 4, 100)
    assert capped.samples_per_sequence == 4 and capped.efficiency == pytest.approx(0.4)
    # over-long samples are not packed (the trainer drops them) but are read: 110 samples of
    # the data pass in 10 sequences; truncated, they fill one sequence each
    lengths = [(100, 1)] * 100 + [(5000, 1)] * 10
    dropped = estimate_packing(lengths, 1000, 64, 110)
    assert dropped.overlong == 10 and dropped.samples_per_sequence == 11
    assert dropped.efficiency == 1.0
    truncated = estimate_packing(lengths, 1000, 64, 110, truncate=True)
    assert truncated.overlong == 10 and truncated.samples_per_sequence == 110 / 20


def test_estimated_lengths_are_the_trainers(converted_demo, demo_tokenizer):
    """The estimate's lengths (image headers, no decoding) equal what the task encoder builds."""
    from megatron_patch.data.energon_reader import iter_split_samples
    from megatron_patch.data.image_processing import ImageGeometry
    from megatron_patch.data.sft_task_encoder import EncoderSettings, SFTTaskEncoder
    from megatron_patch.data.tokenizer import SFTTokenizer
    from megatron_patch.training.packing_estimate import sample_lengths
    geometry = ImageGeometry()
    lengths = sample_lengths(str(converted_demo), demo_tokenizer, geometry, limit=30)
    encoder = SFTTaskEncoder(SFTTokenizer(demo_tokenizer), EncoderSettings(seq_length=4096))
    samples = list(iter_split_samples(converted_demo, "train"))[:30]
    expected = [(encoder.encode_sample(s).encoded.length, len(s.images)) for s in samples]
    assert lengths == expected


def test_plan_estimates_samples_per_sequence_with_packing(converted_demo, demo_tokenizer, capsys):
    common = ["--data-path", str(converted_demo), "--world-size", "1", "--gbs", "2",
              "--margin", "0", "--tokenizer-path", demo_tokenizer]
    assert main(common + ["--trainer-args=--seq-length 1024"]) == 0
    plain = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert main(common + ["--trainer-args=--packing --seq-length 1024"]) == 0
    packed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert plain["SAMPLES_PER_SEQUENCE"] == "1.0" and plain["NSTEP"] == "54"  # 108 / 2
    per_sequence = float(packed["SAMPLES_PER_SEQUENCE"])
    assert per_sequence > 5  # the demo's samples are ~60 tokens
    assert int(packed["NSTEP"]) == -(-108 // (2 * per_sequence))
    assert main(common + ["--trainer-args=--packing", "--samples-per-sequence", "4"]) == 0
    fixed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert fixed["NSTEP"] == "14"  # ceil(108 / 8)
    # without --packing a sequence holds one sample: a set SAMPLES_PER_SEQUENCE is a mistake
    assert main(common + ["--trainer-args=--seq-length 1024", "--samples-per-sequence", "4"]) == 1
    assert "SAMPLES_PER_SEQUENCE=4 applies to --packing only" in capsys.readouterr().out


def test_a_blend_is_estimated_from_its_members(converted_demo, demo_tokenizer, tmp_path, capsys):
    """A blend of the demo with itself (3:1) packs like the demo alone: the estimate reads each
    member in proportion (it was not made at all, and NSTEP counted one sample per sequence)."""
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
                     f"    blend:\n      - weight: 3\n        path: {converted_demo}\n"
                     f"      - weight: 1\n        path: {converted_demo}\n")
    common = ["--world-size", "1", "--gbs", "2", "--margin", "0", "--tokenizer-path",
              demo_tokenizer, "--trainer-args=--packing --seq-length 1024"]
    outputs = []
    for data in (converted_demo, blend):
        assert main(["--data-path", str(data), *common]) == 0
        outputs.append(capsys.readouterr().out)
    single, blended = (dict(line.split("=", 1) for line in out.splitlines()) for out in outputs)
    assert blended["SAMPLES"] == "216"
    assert "each member's first in the blend's proportions" in outputs[1]
    assert float(blended["SAMPLES_PER_SEQUENCE"]) == pytest.approx(
        float(single["SAMPLES_PER_SEQUENCE"]), rel=0.15)


@pytest.mark.parametrize("trainer_args, message", [
    ("--pack", "unknown trainer flag(s) --pack (did you mean --packing?)"),
    ("--seq-length 1024 --bf16 --recompute-granularty full",
     "--recompute-granularty (did you mean --recompute-granularity?)"),
    ("--overlong cut", "argument --overlong: invalid choice: 'cut'"),
    ("--lr-vision fast", "argument --lr-vision: invalid float value: 'fast'"),
])
def test_the_plan_refuses_trainer_flags_the_trainer_would(trainer_args, message, converted_demo,
                                                           capsys):
    """EXTRA_ARGS go through the trainer's own parser before anything is launched."""
    assert main(["--data-path", str(converted_demo), "--world-size", "1",
                 f"--trainer-args={trainer_args}"]) == 1
    output = capsys.readouterr().out
    assert "PLAN_ERROR=EXTRA_ARGS: " in output and message in output


@pytest.mark.parametrize("plan_args, trainer_args, message", [
    (["--mbs", "2"], "--packing", "--packing puts several samples into one sequence per micro "
     "batch; use --micro-batch-size 1 (raise --seq-length to fit more samples) (in the template, "
     "--seq-length is SEQ_LEN; --micro-batch-size is MBS)"),
    ([], "--lr-vision 1e-5 --trainable-modules adapter language_model",
     "--lr-vision sets the learning rate of the vision_model, which --trainable-modules leaves "
     "frozen"),
    (["--world-size", "2"], "--overlap-param-gather", "--overlap-param-gather overlaps the "
     "distributed optimizer's parameter all-gather; add --use-distributed-optimizer"),
])
def test_the_plan_refuses_settings_the_trainer_would(plan_args, trainer_args, message,
                                                     converted_demo, capsys):
    """The trainer's own validation, with the plan's batch and steps, once before launch (after
    it, every rank would print the refusal, then torchrun a traceback)."""
    assert main(["--data-path", str(converted_demo), "--world-size", "1", *plan_args,
                 f"--trainer-args={trainer_args}"]) == 1
    assert f"PLAN_ERROR=the trainer would refuse these settings: {message}" in \
        capsys.readouterr().out


def test_a_plan_of_one_step_has_no_warmup(converted_demo, capsys):
    """The decay needs a step after the warmup (the trainer refuses warmup >= steps)."""
    assert main(["--data-path", str(converted_demo), "--world-size", "1", "--gbs", "200",
                 "--margin", "0", "--warmup-fraction", "0.5"]) == 0
    plan = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert (plan["NSTEP"], plan["WARMUP"]) == ("1", "0")


def test_the_plan_refuses_a_tokenizer_the_trainer_cannot_load(converted_demo, tmp_path, capsys):
    assert main(["--data-path", str(converted_demo), "--world-size", "1",
                 "--tokenizer-path", str(tmp_path)]) == 1
    assert f"tokenizer not found at {tmp_path}: give a directory with tokenizer.json" in \
        capsys.readouterr().out

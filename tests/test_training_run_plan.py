"""The launcher's GBS/NSTEP arithmetic, table-driven, and reading sample counts from .nv-meta."""
import json
import os

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

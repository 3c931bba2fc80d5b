"""Shared fixtures: a small demo dataset, converted once per session with the real converter.
Also hides the GPUs from the CPU suite (device_selection: `pytest -m gpu` runs the GPU tests)."""
import os
import shutil

import pytest
from device_selection import gpu_tests_selected

DEMO_SAMPLES = 120


def pytest_configure(config):
    if not gpu_tests_selected(config.option.markexpr):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """`DEMO_SAMPLES` synthetic VQA records (demo.json + images/), seed 0."""
    from megatron_patch.data.demo_dataset import DemoOptions, generate
    out = tmp_path_factory.mktemp("demo")
    generate(DemoOptions(str(out), num_samples=DEMO_SAMPLES, seed=0))
    return out


@pytest.fixture(scope="session")
def converted_demo(demo_data, tmp_path_factory):
    """The demo converted to shards (90/10 split). Read-only: corrupt `converted_copy` instead."""
    from megatron_patch.data.convert_cli import main as convert_main
    out = tmp_path_factory.mktemp("converted") / "ds"
    rc = convert_main([str(demo_data / "demo.json"), "--image-root", str(demo_data),
                       "--output-dir", str(out), "--split", "90,10", "--workers", "1",
                       "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture
def converted_copy(converted_demo, tmp_path):
    """A private copy of the converted demo, for tests that damage it."""
    return shutil.copytree(converted_demo, tmp_path / "ds")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_data, tmp_path_factory):
    """A 512-token BPE (the tiny model's vocab) trained on the demo's own texts."""
    import json

    from megatron_patch.data.demo_dataset import build_demo_tokenizer
    records = json.loads((demo_data / "demo.json").read_text())
    return build_demo_tokenizer(records, str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def reference_run(converted_demo, demo_tokenizer, tmp_path_factory):
    """8 uninterrupted packed iterations (trainer_runs.RESUME_ARGS), saving at 4 and 8 and
    scoring the whole val split at 8: what every interrupted-and-resumed run must reproduce."""
    from trainer_runs import EVAL_ALL_AT_8, RESUME_ARGS, run_trainer
    save = tmp_path_factory.mktemp("reference") / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *RESUME_ARGS, "--save-interval", 4,
                *EVAL_ALL_AT_8)
    return save

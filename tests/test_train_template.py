"""train/sft_bench_TEMPLATE.sh: DRY_RUN plan lines and preflight failures (no training here)."""
import os
import subprocess
import sys

import pytest

from megatron_patch.data.tokenizer import build_tiny_tokenizer

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "train", "sft_bench_TEMPLATE.sh")


def run_template(env_overrides):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "GPUS_PER_NODE": "0",
           **env_overrides}
    return subprocess.run(["bash", TEMPLATE], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), ["red green"] * 5, 300)


def plan_lines(stdout):
    return dict(line.split("=", 1) for line in stdout.splitlines()
                if "=" in line and line.split("=", 1)[0].isupper() and " " not in line.split("=", 1)[0])


def test_dry_run_prints_the_plan_and_command(converted_demo, tokenizer_dir, tmp_path):
    data = str(converted_demo)
    result = run_template({"MODEL": "tiny", "TP": "2", "PP": "2", "GBS": "30", "DATA_PATH": data,
                           "TOKENIZER_PATH": tokenizer_dir, "SAVE_CKPT_PATH": str(tmp_path / "run")})
    assert result.returncode == 0, result.stderr
    plan = plan_lines(result.stdout)
    # 108 train samples, DP = 4 / (2 x 2) = 1, GBS 30 -> ceil(108 / 30) = 4 steps -> x 1.05 -> 5
    assert plan["WORLD_SIZE"] == "4" and plan["DP"] == "1" and plan["GBS"] == "30"
    assert plan["SAMPLES"] == "108" and plan["NSTEP"] == "5"
    assert "--train-iters 5" in result.stdout and "--nproc-per-node 4" in result.stdout
    assert not (tmp_path / "run").exists()  # nothing launched, nothing created


@pytest.mark.parametrize("overrides,message", [
    ({"DATA_PATH": "/nonexistent"}, "DATA_PATH /nonexistent does not exist"),
    ({"TOKENIZER_PATH": "/nonexistent"}, "TOKENIZER_PATH /nonexistent does not exist"),
    ({"CHECKPOINT_PATH": "/nonexistent"}, "CHECKPOINT_PATH /nonexistent does not exist"),
    ({"TP": "3"}, "not divisible by TP=3"),
])
def test_preflight_failures_name_the_fix(converted_demo, tokenizer_dir, tmp_path, overrides, message):
    data = str(converted_demo)
    env = {"MODEL": "tiny", "DATA_PATH": data, "TOKENIZER_PATH": tokenizer_dir,
           "SAVE_CKPT_PATH": str(tmp_path / "run"), **overrides}
    result = run_template(env)
    assert result.returncode == 1
    assert message in result.stderr

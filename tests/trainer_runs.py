"""Running the trainer as users launch it (a subprocess) and reading back what it wrote: the
helpers the trainer, template, reliability and conversion tests share."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from test_model_reference import init_parallel

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "train" / "pretrain_llava_ov.py"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_command(data, tokenizer, save, *extra, nproc=1) -> list:
    """The trainer on the demo data (tiny model), as one process or under torchrun."""
    args = ["--model", "tiny", "--data-path", str(data), "--tokenizer-path", str(tokenizer),
            "--save", str(save), "--seq-length", "256", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
            "--lr-warmup-iters", "2", "--num-workers", "0", "--log-interval", "1",
            "--shuffle-buffer-size", "16", *map(str, extra)]
    if nproc == 1:
        return [sys.executable, str(ENTRY), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(ENTRY), *args]


def trainer_env(env=None) -> dict:
    return dict(subprocess_env(), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))


def run_trainer(data, tokenizer, save, *extra, nproc=1, check=True, env=None, timeout=600):
    """Runs the trainer on the demo data (tiny model); `env` adds variables (e.g. LLAVA_FAULT)."""
    command = trainer_command(data, tokenizer, save, *extra, nproc=nproc)
    result = run_process_group(command, trainer_env(env), timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer exited {result.returncode}\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def run_process_group(command, env, timeout=600) -> subprocess.CompletedProcess:
    """Runs `command` in a session of its own, output to files, and kills what it leaves behind.

    A trainer killed with SIGKILL (the fault tests) orphans megatron's checkpoint-writer manager
    process; it would hold captured pipes open (hanging `subprocess.run`) and linger. Files are
    not waited on, and killing the process group removes the orphans.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def subprocess_env() -> dict:
    """This process's environment without its own process-group variables (a child trainer
    must form its own group)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def metrics(save) -> dict:
    """iteration -> its logged record (the last one, should an iteration appear twice)."""
    records = {}
    for line in (Path(save) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["iteration"]] = record
    return records


def checkpoint_tensors(checkpoint_dir) -> dict:
    """Every tensor of a dist-checkpoint (model and optimizer state) by key."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors
    if not torch.distributed.is_initialized():
        init_parallel(1, 1)  # reading a dist-checkpoint needs a (one-process) group; one is
        # enough: re-initialising megatron's groups at every call leaks gloo threads
    return {key: value for key, value in load_plain_tensors(str(checkpoint_dir)).items()
            if isinstance(value, torch.Tensor)}


def model_tensors(checkpoint_dir) -> dict:
    return {key: value for key, value in checkpoint_tensors(checkpoint_dir).items()
            if not key.startswith("optimizer.")}


def tensorboard_scalars(directory) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def evaluations(save) -> dict:
    """iteration -> (eval loss from TensorBoard, assistant tokens scored, from the run logs)."""
    losses = tensorboard_scalars(save / "tensorboard").get("eval/loss", {})
    tokens = {int(found[0]): int(found[1]) for log in sorted(save.glob("run_*.log"))
              for found in re.findall(r"evaluation at iteration (\d+): loss \S+ over (\d+) tokens",
                                      log.read_text())}
    assert sorted(losses) == sorted(tokens), (losses, tokens)
    return {iteration: (losses[iteration], tokens[iteration]) for iteration in losses}


# the packed configuration the resume tests compare against (conftest's reference_run)
RESUME_ARGS = ("--train-iters", 8, "--packing", "--micro-batch-size", 1, "--seq-length", 384)
# an evaluation at iteration 8 over the whole val split (12 samples: a partial global batch)
EVAL_ALL_AT_8 = ("--eval-interval", 8, "--eval-iters", 100)

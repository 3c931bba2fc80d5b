"""train/sft_bench_TEMPLATE.sh: DRY_RUN plan lines and preflight failures (no training here)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.data.tokenizer import build_tiny_tokenizer
from megatron_patch.training.run_plan import TEMPLATE_OWNED_FLAGS
from test_model_reference import free_port
from trainer_runs import subprocess_env

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "train", "sft_bench_TEMPLATE.sh")


def run_template(env_overrides, cwd=None):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "GPUS_PER_NODE": "0",
           **env_overrides}
    return subprocess.run(["bash", os.path.abspath(TEMPLATE)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=cwd)


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
    # the plan refuses in EXTRA_ARGS exactly the flags the command sets (and the one that
    # clashes with --lr-warmup-iters); --lr-decay-style may be overridden
    trainer = result.stdout.split("COMMAND: ", 1)[1].split("pretrain_llava_ov.py", 1)[1]
    flags = {item for item in trainer.split() if item.startswith("--")}
    assert flags - {"--lr-decay-style"} == set(TEMPLATE_OWNED_FLAGS) - {
        "--load", "--finetune", "--lr-warmup-fraction"}


def test_cpu_processes_hide_the_gpus(converted_demo, tokenizer_dir, tmp_path):
    """With GPUS_PER_NODE=0 on a GPU node the trainer must not see the GPUs (it would pick NCCL
    and a GPU per process)."""
    bin_dir = tmp_path / "bin"  # the template puts $PYTHON's folder first on PATH
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "torchrun").write_text(
        '#!/bin/sh\necho "trainer sees CUDA_VISIBLE_DEVICES=[${CUDA_VISIBLE_DEVICES-unset}]"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    environment = {key: value for key, value in os.environ.items()
                   if key != "CUDA_VISIBLE_DEVICES"}
    result = subprocess.run(["bash", TEMPLATE], capture_output=True, text=True, timeout=120, env={
        **environment, "PYTHON": str(bin_dir / "python"), "DRY_RUN": "0", "GPUS_PER_NODE": "0",
        "MODEL": "tiny", "DATA_PATH": str(converted_demo), "TOKENIZER_PATH": tokenizer_dir,
        "SAVE_CKPT_PATH": str(tmp_path / "run")})
    assert result.returncode == 0, result.stderr
    assert "trainer sees CUDA_VISIBLE_DEVICES=[]" in result.stdout


# a stand-in for torchrun: publishes an interval checkpoint (iteration 2), signals its whole
# process group (as SLURM's --signal or `kill -- -PGID` do), then, like the trainers, finishes
# its step, logs and -- unless SAVE_FAILS -- publishes a checkpoint of it and exits 15
SIGNALLED_JOB = """#!/bin/bash
publish() {
  mkdir "$SAVE_CKPT_PATH/iter_000000$1" && touch "$SAVE_CKPT_PATH/iter_000000$1/COMPLETE"
  echo $1 > "$SAVE_CKPT_PATH/latest_checkpointed_iteration.txt"
}
trap 'stop=1' TERM
publish 2
echo "trainer: step 3"
sleep 0.5  # the pipeline is up (a job is signalled while it runs, not while it starts)
kill -TERM 0
while [ -z "$stop" ]; do sleep 0.05; done
sleep 0.3
[ -n "$SAVE_FAILS" ] && { echo "trainer: rank 0 failed: could not write checkpoint"; exit 1; }
publish 3
echo "[rank 0] stopping at iteration 3: received SIGTERM"
exit 15
"""


def run_with_stand_in(torchrun, data, tokenizer_dir, save, env=None):
    """The template launching `torchrun` (a bash script standing in for it and the trainers),
    in a session of its own."""
    bin_dir = save.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "torchrun").write_text(torchrun)
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return subprocess.run(["bash", TEMPLATE], capture_output=True, text=True, timeout=120,
                          start_new_session=True, env={
                              **os.environ, "PYTHON": str(bin_dir / "python"), "DRY_RUN": "0",
                              "GPUS_PER_NODE": "0", "MODEL": "tiny", "DATA_PATH": str(data),
                              "TOKENIZER_PATH": tokenizer_dir, "SAVE_CKPT_PATH": str(save),
                              **(env or {})})


@pytest.mark.parametrize("save_fails", [False, True], ids=["saved", "save-failed"])
def test_a_signal_to_the_whole_job_keeps_the_log_and_reports_the_save(converted_demo,
                                                                      tokenizer_dir, tmp_path,
                                                                      save_fails):
    """SIGTERM to every process of the job: the log's tee and the template outlive it, so the
    trainers' lines after the signal reach the log and the template reports the checkpoint of
    the step the trainer stopped at with status 15 (torchrun itself would report a failure);
    an earlier interval checkpoint is not reported as that save."""
    save = tmp_path / "run"
    result = run_with_stand_in(SIGNALLED_JOB, converted_demo, tokenizer_dir, save,
                               {"SAVE_FAILS": "1"} if save_fails else {})
    log = Path(plan_lines(result.stdout)["LOG"]).read_text()
    if save_fails:
        assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr)
        assert "could not write checkpoint" in log
        assert ("first error (the log has the rest): rank 0 failed: could not write checkpoint"
                in result.stdout)
        assert "stopped by SIGTERM without saving the step it stopped at" in result.stdout
        assert f"final checkpoint: {save}/iter_0000002" in result.stdout
        assert f"to resume, rerun the same command with SAVE_CKPT_PATH={save}" in result.stdout
        return
    assert result.returncode == 15, (result.returncode, result.stdout[-2000:], result.stderr)
    assert "stopping at iteration 3: received SIGTERM" in log
    assert (f"stopped by SIGTERM after saving iteration 3; to resume, rerun the same command "
            f"with SAVE_CKPT_PATH={save}") in result.stdout
    assert f"final checkpoint: {save}/iter_0000003" in result.stdout


# torchrun and one trainer: the trainer stops as asked by SIGTERM (or gives up after 5 s);
# torchrun sends SIGTERM to its parent alone (what `docker stop` does to a container's first
# process), then fails as torchrun does when a worker exits 15
STOPPED_FROM_OUTSIDE = """#!/bin/bash
bash -c 'trap "stop=1" TERM; echo "trainer: step 3"
  for _ in $(seq 100); do [ -n "$stop" ] && break; sleep 0.05; done
  [ -z "$stop" ] && { echo "trainer: never asked to stop"; exit 0; }
  mkdir "$SAVE_CKPT_PATH/iter_0000003" && touch "$SAVE_CKPT_PATH/iter_0000003/COMPLETE"
  echo "[rank 0] stopping at iteration 3: received SIGTERM"; exit 15' &
sleep 0.5
kill -TERM $PPID
wait $!
exit 1
"""

# a dropped ssh session: SIGHUP to the job's process group, torchrun's arguments shown
HUNG_UP = """#!/bin/bash
echo "torchrun $*"
sleep 0.5
kill -HUP 0
sleep 0.3
echo "trainer: still training after SIGHUP"
"""


# a rank killed from outside: the other rank loses its connection first; torchrun's summary
# names the killed one
RANK_KILLED = """#!/bin/bash
echo "[10:00:01 rank 0] rank 0 failed: RuntimeError: [pair.cc:537] Read error: Connection reset by peer"
cat <<'SUMMARY'
Root Cause (first observed failure):
[1]:
  time      : 2026-12-06_10:00:01
  host      : node7
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
SUMMARY
exit 1
"""


@pytest.mark.parametrize("killed", [True, False], ids=["sigkill", "error"])
def test_the_cause_of_a_failure_is_the_last_line(converted_demo, tokenizer_dir, tmp_path, killed):
    """After torchrun's traceback: the rank it found killed, or the first error that is not a
    rank losing its connection to the one that failed."""
    job = RANK_KILLED if killed else RANK_KILLED.replace(
        "cat <<", "echo '[rank 1] rank 1 failed: ValueError: a real error'\ncat <<").replace(
        "  traceback : Signal 9 (SIGKILL) received by PID 4242\n", "")
    result = run_with_stand_in(job, converted_demo, tokenizer_dir, tmp_path / "run")
    assert result.returncode == 1
    expected = ("first error: rank 1: Signal 9 (SIGKILL) received by PID 4242 (killed from "
                "outside: out of memory?" if killed else
                "first error (the log has the rest): rank 1 failed: ValueError: a real error")
    assert expected in result.stdout, result.stdout[-2000:]


# torchrun alone was signalled (the template was not): the trainer saved and stopped
TORCHRUN_SIGNALLED = """#!/bin/bash
mkdir "$SAVE_CKPT_PATH/iter_0000003" && touch "$SAVE_CKPT_PATH/iter_0000003/COMPLETE"
echo "[rank 0] stopping at iteration 3: received SIGTERM"
exit 1
"""


def test_a_save_on_a_signal_to_torchrun_alone_is_reported(converted_demo, tokenizer_dir,
                                                          tmp_path):
    save = tmp_path / "run"
    result = run_with_stand_in(TORCHRUN_SIGNALLED, converted_demo, tokenizer_dir, save)
    assert result.returncode == 15, (result.stdout[-2000:], result.stderr)
    assert "stopped by SIGTERM after saving iteration 3" in result.stdout


def test_a_relative_save_path_is_made_absolute(converted_demo, tokenizer_dir, tmp_path):
    """The resume hint names it: the same command from another directory would start afresh."""
    result = run_template({"MODEL": "tiny", "DATA_PATH": str(converted_demo),
                           "TOKENIZER_PATH": tokenizer_dir, "SAVE_CKPT_PATH": "runs/first"},
                          cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert plan_lines(result.stdout)["LOG"].startswith(f"{tmp_path}/runs/first/run_")


def test_a_stop_signal_to_the_template_alone_reaches_the_trainers(converted_demo, tokenizer_dir,
                                                                  tmp_path):
    save = tmp_path / "run"
    result = run_with_stand_in(STOPPED_FROM_OUTSIDE, converted_demo, tokenizer_dir, save)
    assert result.returncode == 15, (result.stdout[-2000:], result.stderr)
    assert (f"stopped by SIGTERM after saving iteration 3; to resume, rerun the same command "
            f"with SAVE_CKPT_PATH={save}") in result.stdout


def test_a_dropped_ssh_session_does_not_stop_the_run(converted_demo, tokenizer_dir, tmp_path):
    """SIGHUP is ignored by the template and not handled by torchrun (which would relay it to
    the trainers: Python dies of it), so all three keep the inherited SIG_IGN."""
    save = tmp_path / "run"
    result = run_with_stand_in(HUNG_UP, converted_demo, tokenizer_dir, save)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr)
    log = Path(plan_lines(result.stdout)["LOG"]).read_text()
    assert "trainer: still training after SIGHUP" in log
    handled = log.split("--signals-to-handle ", 1)[1].split()[0].split(",")
    assert "SIGHUP" not in handled and {"SIGTERM", "SIGINT"} <= set(handled)


def test_a_port_in_use_is_named_with_the_fix(converted_demo, tokenizer_dir, tmp_path):
    """A second job on the node with the default MASTER_PORT: torchrun cannot listen; the
    template says to choose another port (not to fix an error or resume)."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_template({"DRY_RUN": "0", "MODEL": "tiny", "MASTER_PORT": str(port),
                               "DATA_PATH": str(converted_demo), "TOKENIZER_PATH": tokenizer_dir,
                               "SAVE_CKPT_PATH": str(tmp_path / "run")})
    assert result.returncode != 0
    assert (f"port {port} is in use on this node (another job?): rerun with MASTER_PORT set to "
            "a free port") in result.stdout, result.stdout[-3000:]
    assert "rerun the same command" not in result.stdout
    assert "no checkpoint was saved" not in result.stdout


def test_checkpoint_path_lends_weights_only_and_a_run_in_save_resumes(converted_demo, tokenizer_dir,
                                                                    tmp_path):
    """CHECKPOINT_PATH (a base model or an earlier stage's run) is loaded with --finetune, so
    a stage-1 run's iteration and data position do not leak into stage 2; once SAVE holds a
    checkpoint, the template resumes that instead, fully."""
    stage1, save = tmp_path / "stage1", tmp_path / "stage2"
    stage1.mkdir()
    env = {"MODEL": "tiny", "DATA_PATH": str(converted_demo), "TOKENIZER_PATH": tokenizer_dir,
           "SAVE_CKPT_PATH": str(save), "CHECKPOINT_PATH": str(stage1)}
    fresh = run_template(env)
    assert fresh.returncode == 0, fresh.stderr
    assert f"--load {stage1} --finetune" in fresh.stdout
    assert f"START: fresh run from the weights in {stage1}" in fresh.stdout

    (save / "iter_0000003").mkdir(parents=True)  # complete, but the tracker not yet updated
    (save / "iter_0000003" / "COMPLETE").write_text("")
    resumed = run_template(env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--load {save}" in resumed.stdout and "--finetune" not in resumed.stdout
    assert f"START: resuming from {save} (iteration 3)" in resumed.stdout

    (save / "iter_0000999").mkdir()  # past NSTEP: nothing to do
    (save / "iter_0000999" / "COMPLETE").write_text("")
    finished = run_template(env)
    assert finished.returncode == 0, finished.stderr
    assert f"{save} already finished: iteration 999 of NSTEP=" in finished.stdout
    assert f"CHECKPOINT_PATH={save} SAVE_CKPT_PATH=<a new folder>" in finished.stdout
    assert "COMMAND:" not in finished.stdout


def test_a_copy_outside_the_repository_says_where_to_keep_it(tmp_path):
    copy = tmp_path / "train_my_dataset.sh"
    copy.write_text(open(TEMPLATE).read())
    result = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 1
    assert "keep this script in the repository's train/ folder" in result.stderr


def test_warmup_fraction_sets_the_warmup_steps(converted_demo, tokenizer_dir, tmp_path):
    """WARMUP_FRACTION (default 0.002, the recipe's) scales warmup to NSTEP: 108 samples x 10
    epochs / GBS 4 = 270 steps -> x 1.05 = 284; 10% of that is 28 warmup steps."""
    result = run_template({"MODEL": "tiny", "GBS": "4", "EPOCHS": "10", "WARMUP_FRACTION": "0.1",
                           "DATA_PATH": str(converted_demo), "TOKENIZER_PATH": tokenizer_dir,
                           "SAVE_CKPT_PATH": str(tmp_path / "run")})
    assert result.returncode == 0, result.stderr
    plan = plan_lines(result.stdout)
    assert (plan["NSTEP"], plan["WARMUP"]) == ("284", "28")
    assert "--lr-warmup-iters 28 " in result.stdout


@pytest.mark.parametrize("overrides,message", [
    ({"DATA_PATH": "/nonexistent"}, "DATA_PATH /nonexistent does not exist"),
    ({"TOKENIZER_PATH": "/nonexistent"}, "TOKENIZER_PATH /nonexistent does not exist"),
    ({"CHECKPOINT_PATH": "/nonexistent"}, "CHECKPOINT_PATH /nonexistent does not exist"),
    ({"TP": "3"}, "not divisible by TP=3"),
    ({"SAVE_CKPT_PATH": __file__}, f"SAVE_CKPT_PATH {__file__} is a file, not a folder"),
    ({"CHECKPOINT_PATH": "HF"}, "is a Hugging Face model folder: convert it first"),
    ({"EXTRA_ARGS": "--packing --lr-warmup-fraction 0.01 --train-iters=10"},
     "EXTRA_ARGS: --lr-warmup-fraction is the template's own (set WARMUP_FRACTION instead); "
     "--train-iters is the template's own (set EPOCHS (the plan turns it into NSTEP) instead)"),
])
def test_preflight_failures_name_the_fix(converted_demo, tokenizer_dir, tmp_path, overrides, message):
    data = str(converted_demo)
    if overrides.get("CHECKPOINT_PATH") == "HF":  # a downloaded model, not yet converted
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        (hf / "model-00001-of-00001.safetensors").write_bytes(b"")
        overrides = {"CHECKPOINT_PATH": str(hf)}
    env = {"MODEL": "tiny", "DATA_PATH": data, "TOKENIZER_PATH": tokenizer_dir,
           "SAVE_CKPT_PATH": str(tmp_path / "run"), **overrides}
    result = run_template(env)
    assert result.returncode == 1
    assert message in result.stderr


@pytest.mark.parametrize("node", [0, 1])
def test_the_two_node_example_takes_its_place_from_slurm(converted_demo, tokenizer_dir, tmp_path,
                                                          node):
    """sft_8b_2node.sh exports NNODES=2; under SLURM (2 nodes) each node still takes its rank
    and the first node's address from SLURM (both used to get rank 0 and 127.0.0.1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho gpu-001\necho gpu-002\n")
    (bin_dir / "scontrol").chmod(0o755)
    script = Path(TEMPLATE).parent.parent / "examples" / "llava_ov_1_5" / "sft_8b_2node.sh"
    environment = {**subprocess_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                   "PYTHON": sys.executable,
                   "DRY_RUN": "1", "MODEL": "tiny", "DATA_PATH": str(converted_demo),
                   "TOKENIZER_PATH": tokenizer_dir, "CHECKPOINT_PATH": "",
                   "SAVE_CKPT_PATH": str(tmp_path / "run"), "SLURM_NNODES": "2",
                   "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": "gpu-[001-002]"}
    result = subprocess.run(["bash", str(script)], env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (f"torchrun --nnodes 2 --node-rank {node} --nproc-per-node 8 --master-addr gpu-001 "
            in result.stdout)
    assert "--packing" in result.stdout and "--lr-warmup-iters" in result.stdout


def test_real_cpu_run_then_resume(converted_demo, demo_tokenizer, tmp_path):
    """The template itself on CPU: trains, writes iter_* + log + TensorBoard events; a run that
    stopped early resumes from the newest checkpoint to its own NSTEP (a changed plan does not
    stretch it: the saved schedule would not stretch with it), and a finished one says so."""
    save = tmp_path / "run"
    env = {"DRY_RUN": "0", "MODEL": "tiny", "DATA_PATH": str(converted_demo),
           "TOKENIZER_PATH": demo_tokenizer, "SAVE_CKPT_PATH": str(save), "SEQ_LEN": "256",
           "MBS": "2", "GBS": "4", "LR": "1e-3", "MIN_LR": "1e-4", "NUM_WORKERS": "0",
           "EPOCHS": "0.2", "SAVE_INTERVAL": "3", "MASTER_PORT": str(free_port()),
           "EXTRA_ARGS": "--exit-interval 5"}

    def launch():
        return subprocess.run(["bash", TEMPLATE], env={**subprocess_env(), "PYTHON": sys.executable,
                                                       "GPUS_PER_NODE": "0", **env},
                              capture_output=True, text=True, timeout=300)

    first = launch()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    plan = plan_lines(first.stdout)
    # ceil(108 x 0.2 / 4) = 6 steps, x 1.05 -> 7
    assert plan["NSTEP"] == "7" and "fresh run from random weights" in first.stdout
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000005"]
    logs = list(save.glob("run_*_tp1_pp1_gbs4_7steps.log"))
    assert len(logs) == 1 and "iter 5/7 | loss" in logs[0].read_text()
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert f"final checkpoint: {save}/iter_0000005" in first.stdout
    assert (f"not finished: stopped at iteration 5 of NSTEP=7 (--exit-interval or "
            f"--exit-duration-in-mins); to continue, rerun the same command with "
            f"SAVE_CKPT_PATH={save}") in first.stdout

    env.update(EPOCHS="0.4", EXTRA_ARGS="")  # this plan would give 12 steps
    second = launch()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "note: resuming keeps the run's own NSTEP=7 (this plan gives 12" in second.stdout
    assert f"resuming from {save} (iteration 5)" in second.stdout
    assert "iter 6/7" in second.stdout and "iter 7/7" in second.stdout
    assert "resuming keeps the learning-rate schedule" not in second.stdout  # the same one
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    assert "not finished" not in second.stdout

    third = launch()
    assert third.returncode == 0 and "COMMAND:" not in third.stdout
    assert f"{save} already finished: iteration 7 of NSTEP=7" in third.stdout


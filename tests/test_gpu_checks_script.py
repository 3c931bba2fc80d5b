"""scripts/gpu_checks.sh, run here with a stand-in for python: the commands its steps would
start on a lent GPU, checked without one.

A lease is 15 minutes and comes rarely; a flag that a step's script rejects, or a preflight
failure that does not reach every step, is found only there, and costs a step of it. The
stand-in records each command line and answers the preflight (every check ok, or the ones named
in ``FAIL`` failed); each recorded benchmark or trainer command is then parsed by that script's
own parser and, for the trainer benchmark, passed through the trainer's argument checks as the
benchmark does (on a machine that says it has CUDA: the GPU steps' flags need it)."""
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

from megatron_patch.benchmarking import runners, throughput
from megatron_patch.training import arguments

from trainer_runs import REPO, load_benchmark

ALL_STEPS = "tests attention bench profile long graphs levers memory recompute ckpt host"

STAND_IN = f"""#!{sys.executable}
import json, os, re, sys
argv = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
if argv == ["-"]:  # the preflight, read from the script's here-document
    checks = re.search(r"^for check in \\(([^)]*)\\)", sys.stdin.read(), re.M).group(1)
    failing = os.environ.get("FAIL", "").split()
    for name in (part.strip() for part in checks.split(",")):
        print(f"preflight {{name}}: " + ("FAILED RuntimeError: stand-in" if name in failing
                                          else "ok (0.0 s)"))
elif (os.environ.get("OUT_OF_MEMORY") and "tools/benchmark_throughput.py" in argv
      and "--recompute-granularity" not in argv):  # what the benchmark logs, and its exit
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.31 GiB")
    sys.exit(1)
"""


def run_script(tmp_path, steps=ALL_STEPS, budget=900, fail="", out_of_memory=False):
    """Runs gpu_checks.sh with the stand-in: (recorded command lines, summary, output)."""
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    log, out = tmp_path / "commands.jsonl", tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stand_in), STAND_IN_LOG=str(log), OUT=str(out),
               ARCHIVE=str(tmp_path / "gpu.tgz"), STEPS=steps, BUDGET=str(budget), FAIL=fail,
               OUT_OF_MEMORY="1" if out_of_memory else "")
    env.pop("WHEELS", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_checks.sh")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    return commands, (out / "summary.txt").read_text(), result.stdout


def parse_command(command, monkeypatch):
    """Parses one recorded command line as its script would; returns what it parsed into."""
    script, argv = command[0], command[1:]
    if script == "tools/benchmark_throughput.py":
        monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
        args = throughput.parse_args(argv)
        return runners.trainer_namespace(args)  # the trainer's own checks, as the run does
    if script.startswith("benchmarks/"):
        return load_benchmark(os.path.basename(script)[:-3]).parse_args(argv)
    raise AssertionError(f"gpu_checks.sh starts a script this test does not know: {command}")


def step_commands(commands):
    """The recorded commands of the steps: not pip, not the preflight."""
    return [c for c in commands if c[:2] != ["-m", "pip"] and c != ["-"]]


def test_every_step_starts_commands_that_their_scripts_accept(tmp_path, monkeypatch):
    commands, summary, stdout = run_script(tmp_path)
    assert "preflight fused_qkv: ok" in (tmp_path / "out" / "environment.txt").read_text()
    assert "switched off" not in summary and "unknown step" not in summary
    ran = re.findall(r"^(\S+) exit=0 ", summary, re.M)
    assert len(ran) == len(re.findall(r"^\S+ exit=", summary, re.M))  # all of them exit 0
    for expected in ("pytest_gpu", "bench_attention", "bench_both", "bench_profile",
                     "bench_long", "bench_eager", "bench_graphs", "bench_graphs_profile",
                     "bench_no_wgrad_fusion", "bench_cudnn_attention", "bench_recompute_mlp",
                     "activation_memory", "bench_recompute", "bench_checkpoint", "bench_host"):
        assert expected in ran, summary

    steps = step_commands(commands)
    assert ["-m", "pytest", "-m", "gpu"] == steps[0][:4]
    parsed = [parse_command(command, monkeypatch) for command in steps[1:]]
    trainers = [args for command, args in zip(steps[1:], parsed)
                if command[0] == "tools/benchmark_throughput.py"]
    assert len(trainers) == 13
    for args in trainers:  # the benchmark's model and batch in every trainer step
        assert (args.num_layers, args.hidden_size, args.num_query_groups) == (28, 2048, 8)
        assert args.bf16 and args.micro_batch_size == 1
    by_flag = {shlex.join(c[1:]): a for c, a in zip(steps[1:], parsed)}
    graphs = [a for line, a in by_flag.items() if "--cuda-graph-impl local" in line]
    assert len(graphs) == 2 and all(a.max_samples_per_pack for a in graphs)
    assert any(a.packed_attention_kernel == "cudnn" for a in trainers)
    assert any(a.recompute_modules == ["layernorm", "mlp"] for a in trainers)
    assert any(a.seq_length == 16384 for a in trainers)
    assert tarfile.open(tmp_path / "gpu.tgz").getmember("out/summary.txt").isfile()
    assert "packed" in stdout


@pytest.mark.parametrize("failing, switch", [("fused_qkv", ["--no-rope-fusion"]),
                                             ("compiled_norms", ["--no-norm-fusion"]),
                                             ("vision_bias_gelu", ["--no-bias-swiglu-fusion"]),
                                             ("chunked_loss", ["--loss-chunk-tokens", "0"]),
                                             ("embedding_rows",
                                              ["--no-gradient-accumulation-fusion"])])
def test_a_failed_preflight_switches_its_default_off_in_every_step(tmp_path, monkeypatch,
                                                                   failing, switch):
    commands, summary, _ = run_script(tmp_path, steps="bench graphs levers memory host",
                                      fail=failing)
    assert f"switched off after failed preflights: {' '.join(switch)}" in summary
    steps = step_commands(commands)
    model_steps = [c for c in steps if c[0] != "benchmarks/bench_packed_attention.py"]
    assert len(model_steps) == 1 + 3 + 6 + 1 + 1
    for command in model_steps:
        joined = shlex.join(command)
        assert shlex.join(switch) in joined, joined
        parse_command(command, monkeypatch)  # still accepted with the switch added


def test_a_spent_budget_skips_the_steps_and_still_packs(tmp_path):
    commands, summary, _ = run_script(tmp_path, steps="tests bench", budget=40)
    assert step_commands(commands) == []
    assert summary.count("skipped:") == 3  # pytest, the attention bench, both trainers
    assert tarfile.open(tmp_path / "gpu.tgz").getmember("out/environment.txt").isfile()


def test_a_trainer_step_out_of_memory_is_rerun_with_recompute_and_so_are_the_later_ones(
        tmp_path, monkeypatch):
    commands, summary, _ = run_script(tmp_path, steps="attention graphs memory recompute",
                                      out_of_memory=True)
    assert re.search(r"^bench_eager exit=1 ", summary, re.M)
    assert "bench_eager ran out of memory: run again, and every later trainer step, with " \
        "--recompute-granularity selective --recompute-modules layernorm mlp" in summary
    for name in ("bench_eager_recompute", "bench_graphs", "bench_graphs_profile",
                 "activation_memory", "bench_recompute"):
        assert re.search(rf"^{name} exit=0 ", summary, re.M), summary
    trainers = [c for c in step_commands(commands) if c[0] == "tools/benchmark_throughput.py"]
    assert len(trainers) == 5  # the eager step twice, graphs and their profile, full recompute
    for command in trainers:
        args = parse_command(command, monkeypatch)
        if command is trainers[0]:
            assert args.recompute_granularity is None
        elif command is trainers[-1]:  # the "recompute" step: full, not the selective fallback
            assert args.recompute_granularity == "full" and not args.recompute_modules
        else:
            assert args.recompute_granularity == "selective"
            assert args.recompute_modules == ["layernorm", "mlp"]

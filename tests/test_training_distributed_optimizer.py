"""--use-distributed-optimizer on CPU/gloo: megatron's DistributedOptimizer (over torch's Adam,
made to run by compat/cpu.py and compat/torch_adam.py) trains as the plain optimizer does,
--overlap-param-gather's deferred all-gather is forced before a save, the fully reshardable
layout resumes at another TP, a layout this run cannot read is refused with a message, and the
example scripts' bf16 GPU recipe runs and resumes bit for bit (its default per-rank layout)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megatron_patch.training.run_plan import check_not_template_owned
from test_model_reference import free_port
from trainer_runs import (REPO, evaluations, metrics, model_tensors, run_trainer,
                          subprocess_env)

# DP=2 (2 processes), 2 micro-batches of 2 per rank and step; iter_3 is saved right after the
# third optimizer step, before any forward pass could have gathered the updated parameters
DP2_RUN = ("--train-iters", 6, "--global-batch-size", 8, "--save-interval", 3)
OVERLAPPED = ("--use-distributed-optimizer", "--overlap-param-gather", "--overlap-grad-reduce")


@pytest.fixture(scope="module")
def plain_run(converted_demo, demo_tokenizer, tmp_path_factory):
    save = tmp_path_factory.mktemp("plain") / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *DP2_RUN, "--eval-interval", 6,
                "--eval-iters", 100, nproc=2)
    return save


@pytest.fixture(scope="module")
def overlapped_run(converted_demo, demo_tokenizer, tmp_path_factory):
    save = tmp_path_factory.mktemp("overlapped") / "run"
    run_trainer(converted_demo, demo_tokenizer, save, *DP2_RUN, *OVERLAPPED, nproc=2)
    return save


def assert_same_tensors(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for key in actual:
        assert torch.allclose(actual[key], expected[key], rtol=0, atol=atol), key


def test_distributed_optimizer_trains_and_saves_as_the_plain_one(plain_run, overlapped_run):
    """Same losses and grad norms; the checkpoint written right after a step holds the updated
    weights (each rank updated only its shard: without the forced gather most tensors would
    be one step behind, see test_forced_gather_completes_the_deferred_parameter_update)."""
    plain, overlapped = metrics(plain_run), metrics(overlapped_run)
    for iteration in range(1, 7):
        for key in ("train/loss", "train/grad_norm"):
            assert overlapped[iteration][key] == pytest.approx(plain[iteration][key], rel=1e-6)
    for iteration in ("iter_0000003", "iter_0000006"):
        # the sharded update sums in another order: equal to float rounding, not bit for bit
        assert_same_tensors(model_tensors(overlapped_run / iteration),
                            model_tensors(plain_run / iteration), atol=1e-6)
    record = json.loads((overlapped_run / "iter_0000003" / "run_state.json").read_text())
    assert (record["optimizer_format"], record["tensor_parallel_size"]) == ("dp_reshardable", 1)


def test_data_parallel_evaluation_scores_the_whole_val_split(plain_run, reference_run):
    """Each of the 2 ranks reads half the val split's 12 samples in micro-batches of 2, and a
    global batch holds 8: the second is partial. Every assistant token is scored, as in the
    one-process run with packing."""
    assert evaluations(plain_run)[6][1] == evaluations(reference_run)[8][1]


def _export_to_hf(checkpoint, out) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"),
                           "--load", str(checkpoint), "--out", str(out), "--no-progress"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def data_parallel_write_shares(checkpoint_dir) -> dict:
    """Bytes of tensor data each rank wrote (torch_dist names its files __<rank>_<n>.distcp)."""
    shares = {}
    for path in checkpoint_dir.glob("__*_*.distcp"):
        rank = int(path.name.split("_")[2])
        shares[rank] = shares.get(rank, 0) + path.stat().st_size
    return shares


def test_data_parallel_replicas_share_the_checkpoint_writes(plain_run):
    """--ckpt-fully-parallel-save (the default): with the plain optimizer every tensor is held by
    both DP ranks; each writes about half (without it rank 0 writes all, rank 1 nothing)."""
    shares = data_parallel_write_shares(plain_run / "iter_0000003")
    assert sorted(shares) == [0, 1]
    assert min(shares.values()) > 0.3 * sum(shares.values()), shares


def test_a_distributed_optimizer_checkpoint_exports_to_hf(plain_run, overlapped_run, tmp_path):
    """The exporter reads weights only, whatever the optimizer state's layout."""
    exported = _export_to_hf(overlapped_run / "iter_0000003", tmp_path / "overlapped")
    assert len(exported) > 50
    assert_same_tensors(exported, _export_to_hf(plain_run / "iter_0000003", tmp_path / "plain"),
                        atol=1e-6)


@pytest.mark.slow
def test_fully_reshardable_layout_resumes_at_another_tp(converted_demo, demo_tokenizer, tmp_path):
    """Saved by one process, resumed by TP=2 (dist-checkpointing reshards weights and the
    per-parameter optimizer state): iterations 4-6 follow the uninterrupted run."""
    run = ("--train-iters", 6, "--global-batch-size", 4, "--save-interval", 3,
           "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable")
    single = tmp_path / "single"
    run_trainer(converted_demo, demo_tokenizer, single, *run)
    record = json.loads((single / "iter_0000003" / "run_state.json").read_text())
    assert record["optimizer_format"] == "fully_reshardable"
    resumed = tmp_path / "tp2"
    run_trainer(converted_demo, demo_tokenizer, resumed, *run, "--tensor-model-parallel-size", 2,
                "--load", single / "iter_0000003", nproc=2)
    expected, actual = metrics(single), metrics(resumed)
    for iteration in (4, 5, 6):
        assert actual[iteration]["train/loss"] == pytest.approx(expected[iteration]["train/loss"],
                                                                rel=1e-5)
        assert actual[iteration]["train/grad_norm"] == pytest.approx(
            expected[iteration]["train/grad_norm"], rel=1e-4)


def test_a_layout_the_run_cannot_read_is_refused(overlapped_run, converted_demo, demo_tokenizer,
                                                 tmp_path):
    """Per-rank buffers saved at TP=1, resumed at TP=2: refused before loading, with what to do
    (the other unreadable cases: test_which_saved_layouts_a_run_can_read)."""
    result = run_trainer(converted_demo, demo_tokenizer, tmp_path / "run", *DP2_RUN, *OVERLAPPED,
                         "--tensor-model-parallel-size", 2, "--load",
                         overlapped_run / "iter_0000003", nproc=2, check=False)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "CheckpointLayoutError" in log and "--finetune" in log
    assert "per-rank buffers for TP=1 PP=1; this run has TP=2 PP=1" in log
    assert "rerunning the same command resumes" not in log  # it would not


def _step_worker(rank: int, world: int, port: int, overlap: bool, out: str) -> None:
    """One step of megatron's DDP + distributed optimizer on a toy model (2 gloo ranks); saves
    the parameters right after the step and inside parameters_gathered."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from megatron_patch.compat import apply_cpu_redirects, apply_torch_adam_fixes
    from megatron_patch.training.components import parameters_gathered
    apply_cpu_redirects()
    apply_torch_adam_fixes()
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_param_gather=overlap), module)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=0.01, use_distributed_optimizer=True, overlap_param_gather=overlap),
        [ddp])
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    ddp(inputs).square().mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()
    after_step = [p.detach().clone() for p in ddp.parameters()]
    with parameters_gathered(ddp):
        gathered = [p.detach().clone() for p in ddp.parameters()]
    hooks_back = ddp.use_forward_hook == overlap
    try:
        with parameters_gathered(ddp):
            raise OSError("disk full")  # a failing save must not leave the hooks off
    except OSError:
        hooks_back = hooks_back and ddp.use_forward_hook == overlap
    torch.save({"after_step": after_step, "gathered": gathered, "hooks_back": hooks_back},
               os.path.join(out, f"{int(overlap)}_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_forced_gather_completes_the_deferred_parameter_update(tmp_path):
    """With --overlap-param-gather a step leaves every rank with only its own shard updated (the
    rest arrives during the next forward pass); parameters_gathered, which the trainer's
    evaluate() and save() run under, makes them equal to a synchronously gathered step's."""
    for overlap in (False, True):
        mp.start_processes(_step_worker, args=(2, free_port(), overlap, str(tmp_path)),
                           nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        synchronous = torch.load(tmp_path / f"0_{rank}.pt")
        deferred = torch.load(tmp_path / f"1_{rank}.pt")
        reference = synchronous["after_step"]
        stale = [not torch.equal(a, b) for a, b in zip(deferred["after_step"], reference)]
        assert any(stale), "the step should have left the other rank's shard un-gathered"
        assert all(torch.equal(a, b) for a, b in zip(deferred["gathered"], reference))
        assert deferred["hooks_back"] and synchronous["hooks_back"]


def _ranks(tp: int, pp: int):
    from megatron_patch.training.parallel_setup import Ranks
    return Ranks(rank=0, world_size=tp * pp, tp_rank=0, pp_rank=0, dp_rank=0, dp_size=1,
                 tp_size=tp, pp_size=pp, is_first_stage=True, is_last_stage=True)


@pytest.mark.parametrize("saved, layout, tp, readable", [
    ({}, "replicated", 2, True),  # a record from before layouts were recorded: plain optimizer
    ({"optimizer_format": "fully_reshardable", "tensor_parallel_size": 1,
      "pipeline_parallel_size": 1}, "dp_reshardable", 2, True),
    ({"optimizer_format": "dp_reshardable", "tensor_parallel_size": 2,
      "pipeline_parallel_size": 1}, "fully_reshardable", 2, True),
    ({"optimizer_format": "dp_reshardable", "tensor_parallel_size": 1,
      "pipeline_parallel_size": 1}, "dp_reshardable", 2, False),
    ({"optimizer_format": "fully_reshardable"}, "replicated", 1, False),
    ({}, "fully_reshardable", 1, False),  # the plain optimizer's keys are another format
])
def test_which_saved_layouts_a_run_can_read(saved, layout, tp, readable):
    """The load reads the layout that was saved (whatever this run will save)."""
    from megatron_patch.training.checkpointing import (CheckpointLayoutError,
                                                       readable_optimizer_layout)
    if readable:
        expected = saved.get("optimizer_format", "replicated")
        assert readable_optimizer_layout(saved, layout, _ranks(tp, 1), "ckpt") == expected
    else:
        with pytest.raises(CheckpointLayoutError, match="--finetune"):
            readable_optimizer_layout(saved, layout, _ranks(tp, 1), "ckpt")


def example_script_args(script="examples/llava_ov_1_5/sft_4b_1node_8gpu.sh") -> list:
    """The EXTRA_ARGS default of an example launch script (the GPU recipe)."""
    text = (REPO / script).read_text()
    return re.search(r'EXTRA_ARGS="\$\{EXTRA_ARGS:-(.*?)\}"', text).group(1).split()


@pytest.mark.parametrize("script, layout", [
    ("sft_4b_1node_8gpu.sh", ()),  # DP 2: the overlapped reduce and gather have peers
    ("sft_8b_2node.sh", ("--tensor-model-parallel-size", 2)),  # the script's TP, with its SP
], ids=["4b-dp2", "8b-tp2"])
def test_example_gpu_recipe_trains_in_bf16_and_resumes_exactly(script, layout, converted_demo,
                                                              demo_tokenizer, tmp_path):
    """The example scripts' flags (bf16 + fp32 master weights, distributed optimizer, overlapped
    grad reduce and param gather, checkpoints written in the background with a reused save plan,
    full recompute, packing; sequence parallelism at TP 2; the chunked loss and
    gradient-accumulation fusion, GPU defaults) on CPU: the checkpoint holds bf16
    weights and a resume continues bit for bit. A save every step makes the reference's last
    checkpoint one written from the reused plan (its 4th save; the resumed run's 2nd)."""
    recipe = example_script_args(f"examples/llava_ov_1_5/{script}")
    check_not_template_owned(recipe)  # the template's plan would refuse it before launching
    assert {"--bf16", "--use-distributed-optimizer", "--overlap-param-gather", "--async-save",
            "--ckpt-assume-constant-structure", "--manual-gc", "--recompute-granularity"} \
        <= set(recipe)
    assert ("--sequence-parallel" in recipe) == bool(layout)
    # with the defaults a GPU run has and the CPU's leave off: the chunked loss (in chunks of
    # 100 tokens here) and gradient-accumulation fusion
    gpu_defaults = ("--loss-chunk-tokens", 100, "--gradient-accumulation-fusion")
    run = ("--train-iters", 4, "--save-interval", 1, "--global-batch-size", 4,
           "--micro-batch-size", 1, "--seq-length", 384, *layout, *recipe, *gpu_defaults)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_trainer(converted_demo, demo_tokenizer, reference, *run, nproc=2)
    run_trainer(converted_demo, demo_tokenizer, resumed, *run,
                "--load", reference / "iter_0000002", nproc=2)
    kernels = json.loads((reference / "run_config.json").read_text())["kernels"]
    assert kernels["loss_chunk_tokens"] == 100 and kernels["gradient_accumulation_fusion"]
    expected, actual = metrics(reference), metrics(resumed)
    assert sorted(actual) == [3, 4]
    for iteration in (3, 4):
        for key in ("train/loss", "train/grad_norm", "data/packing_efficiency"):
            assert actual[iteration][key] == expected[iteration][key], (iteration, key)
    weights = model_tensors(resumed / "iter_0000004")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert_same_tensors(weights, model_tensors(reference / "iter_0000004"))

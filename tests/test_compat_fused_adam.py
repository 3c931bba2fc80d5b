"""torch's fused AdamW for megatron's optimizer on a GPU (compat/fused_adam.py), checked on the
CPU, where torch has the same fused kernel: the GPU's choice is forced by its one predicate.
The trainer's optimizer takes it, it computes megatron's AdamW update, and a run saved and
resumed with it (plain and distributed optimizer) continues exactly as an uninterrupted one."""
import pytest
import torch

from megatron_patch.compat import fused_adam

STEPS, SAVED_AT = 4, 2


class FusedCalls:
    """Counts torch's fused AdamW kernel calls (and still runs them)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        kernel = torch._fused_adamw_

        def counted(*args, **kwargs):
            self.calls += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(torch, "_fused_adamw_", counted)


def _runner(distributed: bool):
    """The benchmark's megatron trainer on the tiny model in bf16 (one rank), and its packs."""
    from megatron_patch.benchmarking import throughput
    from megatron_patch.benchmarking.runners import MegatronRunner, trainer_namespace
    from megatron_patch.benchmarking.synthetic import SyntheticPackedBatches
    from megatron_patch.model import get_config
    from megatron_patch.training.parallel_setup import seed_everything
    argv = ["--model", "tiny", "--seq-length", "256", "--image-size-min", "56",
            "--image-size-max", "112", "--steps", str(STEPS), "--warmup-steps", "0",
            "--lr", "1e-3", "--bf16"]
    args = throughput.parse_args(argv + (["--use-distributed-optimizer"] if distributed else []))
    train_args = trainer_namespace(args)
    cfg = get_config("tiny")
    batches = SyntheticPackedBatches(throughput.synthetic_spec(args, cfg, train_args))
    seed_everything(args.seed)  # the same initial weights for every runner
    return MegatronRunner(train_args, cfg, torch.device("cpu")), batches


def _steps(runner, batches, count: int) -> list:
    return [float(runner.step([next(batches)])[0]) for _ in range(count)]


def _parameters(runner) -> list:
    return [p.detach().float().clone() for p in runner.model.module.parameters()]


def _on(monkeypatch, gpu: bool) -> None:
    """The machine compat/fused_adam.py sees: a GPU (the fused kernel) or the CPU."""
    monkeypatch.setattr(fused_adam, "_on_gpu", lambda params: gpu and bool(params))


@pytest.fixture
def parallel():
    from megatron_patch.training.parallel_setup import initialize, shutdown
    yield initialize(1, 1, 1234)
    shutdown()


def test_the_cpu_keeps_torchs_default_kernel(parallel):
    runner, _ = _runner(distributed=False)
    groups = runner.optimizer.optimizer.param_groups
    assert fused_adam.use_fused_kernels(runner.optimizer) == 0
    assert not any(group.get("fused") for group in groups)


@pytest.mark.parametrize("distributed", [False, True])
def test_on_a_gpu_the_update_is_one_fused_kernel_with_megatrons_arithmetic(
        parallel, monkeypatch, distributed):
    default, batches = _runner(distributed)
    expected_losses = _steps(default, batches, 2)
    expected = _parameters(default)
    default.close()

    _on(monkeypatch, gpu=True)
    fused_calls = FusedCalls(monkeypatch)
    fused, batches = _runner(distributed)
    inner = fused.optimizer.optimizer
    assert all(group["fused"] and not group["foreach"] for group in inner.param_groups)
    losses = _steps(fused, batches, 2)
    assert fused_calls.calls == 2 * len(inner.param_groups)  # one per group and step
    assert all(state["step"].dtype == torch.float32 and float(state["step"]) == 2
               for state in inner.state.values())
    # the same AdamW (megatron's groups: learning rates, betas, no decay for norms and biases)
    # in another order of operations: the bf16 weights equal, or one rounding step apart
    assert losses[0] == expected_losses[0] and losses[1] == pytest.approx(expected_losses[1],
                                                                         rel=1e-3)
    moved = sum(int((a != b).sum()) for a, b in zip(_parameters(fused), expected))
    for got, want in zip(_parameters(fused), expected):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4)
    assert moved < 0.01 * sum(p.numel() for p in expected)


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("saved_on_gpu, resumed_on_gpu", [(True, True), (False, True),
                                                          (True, False)])
def test_a_run_resumes_exactly_with_the_kernel_of_the_machine_it_resumes_on(
        parallel, monkeypatch, tmp_path, distributed, saved_on_gpu, resumed_on_gpu):
    from megatron_patch.training.checkpointing import (RunState, load_checkpoint,
                                                       optimizer_format, save_checkpoint)
    from megatron_patch.training.optimizer import build_scheduler
    from megatron_patch.training.parallel_setup import current_ranks
    fused_calls = FusedCalls(monkeypatch)
    layout = optimizer_format(distributed)

    # the reference: one run whose kernel changes where the other is saved and resumed
    _on(monkeypatch, saved_on_gpu)
    reference, batches = _runner(distributed)
    expected = _steps(reference, batches, SAVED_AT)
    _on(monkeypatch, resumed_on_gpu)
    fused_adam.use_fused_kernels(reference.optimizer)
    expected += _steps(reference, batches, STEPS - SAVED_AT)
    reference.close()

    _on(monkeypatch, saved_on_gpu)
    first, batches = _runner(distributed)
    assert _steps(first, batches, SAVED_AT) == expected[:SAVED_AT]
    save_checkpoint(str(tmp_path), first.chunks, first.optimizer,
                    build_scheduler(first.args, first.optimizer), RunState(iteration=SAVED_AT),
                    None, current_ranks(), {}, layout=layout)
    first.close()

    _on(monkeypatch, resumed_on_gpu)
    resumed, batches = _runner(distributed)
    # torch's load brings the saving machine's kernel flags, compat/torch_adam.py host step
    # counters: the load hands the groups to this machine's kernel again
    loaded = load_checkpoint(str(tmp_path), resumed.chunks, resumed.optimizer,
                             build_scheduler(resumed.args, resumed.optimizer), current_ranks(),
                             layout=layout)
    assert loaded.resumed and loaded.state.iteration == SAVED_AT
    inner = resumed.optimizer.optimizer
    assert all(bool(group["fused"]) is resumed_on_gpu for group in inner.param_groups)
    assert all(float(state["step"]) == SAVED_AT for state in inner.state.values())
    for _ in range(SAVED_AT):
        next(batches)
    calls = fused_calls.calls
    assert _steps(resumed, batches, STEPS - SAVED_AT) == expected[SAVED_AT:]
    assert (fused_calls.calls > calls) is resumed_on_gpu

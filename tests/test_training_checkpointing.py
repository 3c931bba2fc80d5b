"""Loading and saving checkpoints in-process. A model whose modules keep an ``_extra_state`` (as
Transformer Engine's do) loads a checkpoint written without them (the local spec's, e.g. the HF
converter's); TE is not installed here, so torch's RMSNorm is given an extra state instead. RNG
states cross between CPU and GPU runs. The checkpoint writer's warm-up (compat/checkpoint_writer)
leaves megatron's result queue clean and never keeps a process from exiting. A checkpoint that
cannot serve the run (none where --finetune asks for weights) is refused first."""
import os

import pytest
import torch

from megatron_patch.model import build_model, get_config
from megatron_patch.training.checkpointing import NothingToLoadError, load_checkpoint
from megatron_patch.training.parallel_setup import current_ranks
from test_model_reference import init_parallel


def _load(checkpoint):
    model = build_model(get_config("tiny"), attention_backend="local")
    loaded = load_checkpoint(str(checkpoint), [model], None, None, current_ranks(),
                             weights_only=True)
    return model, loaded


def test_a_checkpoint_without_extra_states_loads_into_a_model_with_them(reference_run,
                                                                        monkeypatch):
    init_parallel(1, 1)
    checkpoint = reference_run / "iter_0000004"
    plain, _ = _load(checkpoint)

    restored = []
    monkeypatch.setattr(torch.nn.RMSNorm, "get_extra_state", lambda self: torch.tensor([7.0]),
                        raising=False)
    monkeypatch.setattr(torch.nn.RMSNorm, "set_extra_state",
                        lambda self, state: restored.append(state), raising=False)
    with_states, loaded = _load(checkpoint)
    # megatron's own linears keep an (empty) extra state, saved with them; the norms' are new
    norms = [name for name, module in with_states.named_modules()
             if isinstance(module, torch.nn.RMSNorm)]
    assert len(norms) == 17  # 4 layers x (input, pre-MLP, q, k) + the final norm
    assert f"{len(norms)} Transformer Engine _extra_state entries are not in the checkpoint" in \
        " ".join(loaded.notes)
    assert restored == []  # nothing to restore: those modules keep their defaults
    expected, actual = ({name: value for name, value in model.state_dict().items()
                         if not name.endswith("_extra_state")} for model in (plain, with_states))
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_device_rng_states_are_restored_only_on_the_device_kind_they_came_from():
    """A CPU run's tracker states are CPU generator states, which a CUDA generator refuses
    (and the reverse): resuming on the other kind of device restores the host generators only."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron_patch.training.checkpointing import _rng_state, _set_rng_state

    init_parallel(1, 1)
    tracker = get_cuda_rng_tracker()
    saved = _rng_state()
    assert saved["tracker"]  # megatron seeded its tracker (init_parallel)
    torch.rand(3)
    expected_draw = torch.rand(3)

    from_gpu = {**saved, "cuda": torch.zeros(16, dtype=torch.uint8),
                "tracker": {name: torch.zeros(16, dtype=torch.uint8) for name in saved["tracker"]}}
    before = {name: state.clone() for name, state in tracker.get_states().items()}
    assert _set_rng_state(from_gpu) is False
    assert all(torch.equal(tracker.get_states()[name], before[name]) for name in before)
    torch.rand(3)
    assert torch.equal(torch.rand(3), expected_draw)  # the host generator was restored

    assert _set_rng_state(saved) is True
    assert all(torch.equal(tracker.get_states()[name], saved["tracker"][name])
               for name in saved["tracker"])


def test_graph_safe_tracker_states_are_saved_as_states_and_restored_into_the_generators():
    """Under --cuda-graph-impl local megatron's tracker holds generators (graph-safe; CPU ones
    play them here): the checkpoint keeps their byte states, which a resume writes back into
    the live generators, the objects captured graphs refer to."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron_patch.training.checkpointing import _rng_state, _set_rng_state

    init_parallel(1, 1)
    tracker = get_cuda_rng_tracker()
    generators = {name: torch.Generator().manual_seed(index)
                  for index, name in enumerate(tracker.get_states())}
    tracker.set_states(dict(generators))
    saved = _rng_state()
    assert all(torch.equal(saved["tracker"][name], generator.get_state())
               for name, generator in generators.items())
    expected = {name: torch.rand(4, generator=generator) for name, generator in generators.items()}
    assert _set_rng_state(saved) is True
    live = tracker.get_states()
    for name, generator in generators.items():
        assert live[name] is generator
        assert torch.equal(torch.rand(4, generator=generator), expected[name])
    init_parallel(1, 1)  # a plain tracker again for the other tests


def _save_and_load_one_tensor(directory):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    saved = torch.arange(6.0).reshape(2, 3)
    directory.mkdir()
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", saved)}, str(directory))
    loaded = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 3))}, str(directory))
    return saved, loaded["w"]


def test_writer_warmup_leaves_megatrons_result_queue_empty_for_the_save(tmp_path, monkeypatch):
    """The warm-up passes a dummy result through megatron's queue; a save after it must read its
    own results, not the dummy (else the checkpoint's metadata would be wrong)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_patch.compat import checkpoint_writer

    init_parallel(1, 1)
    monkeypatch.setattr(checkpoint_writer, "_warmup", None)
    checkpoint_writer.start()
    first = checkpoint_writer._warmup
    checkpoint_writer.start()
    assert checkpoint_writer._warmup is first  # once per process
    checkpoint_writer.wait()
    assert not first.is_alive()
    queue = filesystem_async._results_queue
    assert queue is not None and queue.empty()
    saved, loaded = _save_and_load_one_tensor(tmp_path / "ckpt")
    assert torch.equal(loaded, saved)
    assert filesystem_async._results_queue is queue and queue.empty()  # the warmed one was used


def test_a_failed_writer_warmup_changes_nothing(tmp_path, monkeypatch, caplog):
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_patch.compat import checkpoint_writer

    def refuse():
        raise OSError("no process for you")

    init_parallel(1, 1)
    monkeypatch.setattr(checkpoint_writer, "_warmup", None)
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    monkeypatch.setattr(checkpoint_writer, "_start_results_queue", refuse)
    with caplog.at_level("DEBUG", logger=checkpoint_writer.__name__):
        checkpoint_writer.start()
        checkpoint_writer.wait()
    assert "warm-up skipped: OSError: no process for you" in caplog.text
    monkeypatch.undo()
    saved, loaded = _save_and_load_one_tensor(tmp_path / "ckpt")
    assert torch.equal(loaded, saved)


RUN_ENDING_DURING_THE_WARMUP = """
import multiprocessing, sys, time
if __name__ == "__main__":
    from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: F401
    from megatron_patch.compat import checkpoint_writer
    checkpoint_writer.start()
    while not multiprocessing.active_children():  # the queue's server is starting
        time.sleep(0.001)
    sys.exit(3)  # as a run that fails at startup does
"""


def test_a_run_ending_during_the_writer_warmup_exits(tmp_path):
    """Without waiting for the server's start at exit, multiprocessing's exit handler waited
    forever for a server that nobody would stop (a trainer failing at startup hung)."""
    import subprocess
    import sys

    from trainer_runs import REPO, run_process_group, subprocess_env
    script = tmp_path / "ends_early.py"
    script.write_text(RUN_ENDING_DURING_THE_WARMUP)
    env = dict(subprocess_env(), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    try:
        result = run_process_group([sys.executable, str(script)], env, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process did not exit within 120 s") from None
    assert result.returncode == 3, result.stderr[-2000:]


RANK_KILLED_AFTER_THE_WARMUP = """
import os, signal
if __name__ == "__main__":
    from megatron_patch.compat import checkpoint_writer
    checkpoint_writer.start()
    checkpoint_writer.wait()
    print(checkpoint_writer._queue_server().pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer: no exit handler runs
"""


def test_the_queue_server_ends_with_a_killed_rank(tmp_path):
    """Nothing stops the server of a process killed with SIGKILL; it must notice and end
    instead of living on as an orphan (it used to, holding torch in memory)."""
    import subprocess
    import sys
    import time

    from trainer_runs import REPO, subprocess_env
    script = tmp_path / "killed.py"
    script.write_text(RANK_KILLED_AFTER_THE_WARMUP)
    env = dict(subprocess_env(), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    output = tmp_path / "output.txt"
    with open(output, "w") as handle:  # not a pipe: an orphan would hold it open
        killed = subprocess.run([sys.executable, str(script)], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, timeout=120)
    assert killed.returncode == -9, output.read_text()[-2000:]
    server = int(output.read_text().split()[-1])
    deadline = time.monotonic() + 20
    while process_is_running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not process_is_running(server), "the killed process's queue server lives on"
    finally:
        if process_is_running(server):
            os.kill(server, 9)


def process_is_running(pid: int) -> bool:
    """Neither gone nor a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("assume_constant_structure", [True, False])
def test_saves_with_a_constant_structure_reuse_checks_and_plan(tmp_path, monkeypatch,
                                                                assume_constant_structure):
    """--ckpt-assume-constant-structure: one strategy for the run; only the first save validates
    the sharding and makes a local plan, the first two gather the plans of all ranks (megatron
    reuses the global plan once two saves made the same), the later ones reuse it. Every
    checkpoint holds the values of its own save, the later ones included."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor, state_dict_utils
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from megatron_patch.training.checkpointing import SaveStrategy

    init_parallel(1, 1)
    validated, planned, gathered = [], [], []
    monkeypatch.setattr(state_dict_utils, "validate_sharding_integrity",
                        lambda *args, **kwargs: validated.append(save))
    plan, gather = MCoreSavePlanner.create_local_plan, state_dict_saver._DistWrapper.gather_object
    monkeypatch.setattr(MCoreSavePlanner, "create_local_plan",
                        lambda self: planned.append(save) or plan(self))
    monkeypatch.setattr(state_dict_saver._DistWrapper, "gather_object",
                        lambda self, value: gathered.append(save) or gather(self, value))

    def sharded(weight, bias):
        return {"w": ShardedTensor.from_rank_offsets("w", weight),
                "b": ShardedTensor.from_rank_offsets("b", bias)}

    strategy = SaveStrategy(assume_constant_structure=assume_constant_structure)
    saved = []
    for save in range(4):
        weight, bias = torch.randn(4, 3), torch.full((5,), float(save))
        writer, validate = strategy.for_next_save()
        (tmp_path / str(save)).mkdir()
        dist_checkpointing.save(sharded(weight, bias), str(tmp_path / str(save)),
                                sharded_strategy=writer, validate_access_integrity=validate)
        saved.append((weight, bias))
    gathers = [gathered.count(save) for save in range(4)]  # the plans', then the write results
    if assume_constant_structure:
        assert (validated, planned, gathers) == ([0], [0], [2, 2, 1, 1])
    else:
        assert (validated, planned, gathers) == ([0, 1, 2, 3], [0, 1, 2, 3], [2, 2, 2, 2])
    for save, (weight, bias) in enumerate(saved):
        loaded = dist_checkpointing.load(sharded(torch.zeros(4, 3), torch.zeros(5)),
                                         str(tmp_path / str(save)))
        assert torch.equal(loaded["w"], weight) and torch.equal(loaded["b"], bias), save


def test_finetune_from_where_there_is_no_checkpoint_is_refused(tmp_path):
    """--load X --finetune asks for weights: none under X is an error naming what was skipped,
    not a run from random weights; without --finetune (auto-resume) it starts from scratch."""
    (tmp_path / "iter_0000002.partial-1").mkdir()
    with pytest.raises(NothingToLoadError, match="--finetune: no complete checkpoint there; "
                       "skipping iter_0000002.partial-1: a save that did not finish. Give a "
                       "converted base model"):
        load_checkpoint(str(tmp_path), None, None, None, None, weights_only=True)
    fresh = load_checkpoint(str(tmp_path), None, None, None, None)
    assert fresh.path is None and fresh.state.iteration == 0

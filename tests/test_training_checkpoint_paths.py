"""Checkpoint publishing and choice: incomplete saves are never loaded, and say why."""
import os

import pytest

from megatron_patch.training.checkpoint_paths import (TRACKER_NAME, choose_checkpoint,
                                                      complete_iterations, partial_dir, publish,
                                                      remove_old_checkpoints)


def save_checkpoint(save, iteration, finish=True):
    path = partial_dir(save, iteration, "t")
    os.makedirs(path)
    open(os.path.join(path, "model.bin"), "w").write(str(iteration))
    return publish(save, path, iteration) if finish else path


def test_newest_complete_checkpoint_wins_and_partial_saves_are_named(tmp_path):
    save = str(tmp_path)
    save_checkpoint(save, 10)
    save_checkpoint(save, 20)
    save_checkpoint(save, 30, finish=False)          # killed mid-save
    os.makedirs(os.path.join(save, "iter_0000040"))   # a folder with no COMPLETE marker
    choice = choose_checkpoint(save)
    assert choice.iteration == 20 and choice.path.endswith("iter_0000020")
    assert any("iter_0000030.partial-t" in note for note in choice.notes)
    assert any("iter_0000040" in note for note in choice.notes)
    assert open(os.path.join(save, TRACKER_NAME)).read().strip() == "20"


def test_tracker_ahead_of_disk_falls_back_and_says_so(tmp_path):
    save = str(tmp_path)
    save_checkpoint(save, 5)
    open(os.path.join(save, TRACKER_NAME), "w").write("9\n")
    choice = choose_checkpoint(save)
    assert choice.iteration == 5 and any("tracker" in note for note in choice.notes)


def test_explicit_iter_dir_and_empty_run_dir(tmp_path):
    save = str(tmp_path)
    path = save_checkpoint(save, 7)
    assert choose_checkpoint(path).iteration == 7
    os.makedirs(os.path.join(save, "iter_0000008"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        choose_checkpoint(os.path.join(save, "iter_0000008"))
    assert choose_checkpoint(str(tmp_path / "new")).path is None


def test_keep_last_never_removes_the_newest(tmp_path):
    save = str(tmp_path)
    for iteration in (1, 2, 3, 4):
        save_checkpoint(save, iteration)
    remove_old_checkpoints(save, 2)
    assert complete_iterations(save) == [3, 4]
    remove_old_checkpoints(save, 0)
    assert complete_iterations(save) == [4]

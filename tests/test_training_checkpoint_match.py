"""A checkpoint made with another model or another tokenizer is refused before the model is
built: run checkpoints by their run_state.json (arguments, tokenizer fingerprint), converted base
models by their hf_conversion.json (model config, tokenizer); unrecorded ones are let through.
A resume into a data loader built another way is refused too."""
import argparse
import json

import pytest

from megatron_patch.data.tokenizer import (SFTTokenizer, build_tiny_tokenizer,
                                           fingerprint_differences)
from megatron_patch.model import get_config
from megatron_patch.training.checkpoint_match import check_checkpoint_fits
from megatron_patch.training.checkpointing import (CheckpointLayoutError, ModelMismatchError,
                                                   TokenizerMismatchError)

SIZES = dict.fromkeys(("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                       "num_query_groups", "vision_num_layers", "vision_hidden_size"))


def _checkpoint(run, **files):
    """run/iter_0000003, complete, with `files` ({name: JSON object}) in it."""
    checkpoint = run / "iter_0000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    for name, content in files.items():
        (checkpoint / name).write_text(json.dumps(content))
    return checkpoint


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer):
    return SFTTokenizer(demo_tokenizer)


@pytest.fixture(scope="module")
def other_tokenizer(tokenizer, tmp_path_factory):
    """Same special tokens and size, trained on other text."""
    texts = [f"Trains cross {i} rivers and climb mountains at dawn." for i in range(300)]
    return SFTTokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("other")), texts,
                                             vocab_size=tokenizer.vocab_size))


def test_a_run_of_another_model_is_named(tmp_path, tokenizer):
    checkpoint = _checkpoint(tmp_path, **{"run_state.json": {"args": {"model": "tiny", **SIZES}}})
    same, cfg = argparse.Namespace(model="tiny", **SIZES), get_config("tiny")
    check_checkpoint_fits(str(tmp_path), same, cfg, tokenizer)
    with pytest.raises(ModelMismatchError, match=f"{checkpoint} was trained with --model tiny; "
                       "this run asks for --model llava-ov-1.5-4b. Build the same model"):
        check_checkpoint_fits(str(tmp_path), argparse.Namespace(**{**vars(same), "model":
                                                                    "llava-ov-1.5-4b"}),
                              cfg, tokenizer)
    with pytest.raises(ModelMismatchError, match="trained with the preset's sizes; this run asks "
                       "for --num-layers 2"):
        check_checkpoint_fits(str(tmp_path), argparse.Namespace(**{**vars(same), "num_layers": 2}),
                              cfg, tokenizer)


def test_a_converted_model_of_other_shapes_is_named(tmp_path, tokenizer):
    record = {"model": "tiny", "model_config": get_config("tiny").to_dict()}
    checkpoint = _checkpoint(tmp_path, **{"hf_conversion.json": record})
    args = argparse.Namespace(model="tiny", **SIZES)
    check_checkpoint_fits(str(tmp_path), args, get_config("tiny"), tokenizer)
    smaller = get_config("tiny", {"num_layers": 2, "vision_hidden_size": 32})
    with pytest.raises(ModelMismatchError) as error:
        check_checkpoint_fits(str(tmp_path), args, smaller, tokenizer)
    assert str(error.value) == (
        f"--load {tmp_path}: {checkpoint} was converted as --model tiny, this run builds --model "
        "tiny; they differ in language num_layers 4 (this run's: 2), vision hidden_size 64 (this "
        "run's: 32). Train with --model tiny (the template's MODEL), or convert the model you "
        "mean to train")


def test_another_tokenizer_is_refused(tmp_path, tokenizer, other_tokenizer):
    """The case nothing else catches: the same vocabulary size, other ids."""
    assert other_tokenizer.vocab_size == tokenizer.vocab_size
    run_state = {"args": {"model": "tiny", **SIZES, "tokenizer_path": tokenizer.path},
                 "tokenizer": tokenizer.fingerprint()}
    checkpoint = _checkpoint(tmp_path, **{"run_state.json": run_state})
    args, cfg = argparse.Namespace(model="tiny", **SIZES), get_config("tiny")
    check_checkpoint_fits(str(tmp_path), args, cfg, SFTTokenizer(tokenizer.path))
    with pytest.raises(TokenizerMismatchError,
                       match=f"--tokenizer-path {other_tokenizer.path} is not the tokenizer "
                             f"{checkpoint} was made with \\({tokenizer.path}\\): it splits the "
                             "same text into other ids. The model would read ids it never learned"):
        check_checkpoint_fits(str(tmp_path), args, cfg, other_tokenizer)


def test_a_converted_models_tokenizer_is_checked_also_from_old_records(tmp_path, tokenizer):
    """Records written before fingerprints hold the special ids only; a run checkpoint without
    a fingerprint is checked against the base model its run loaded."""
    moved = {**tokenizer.special_ids, "<|im_end|>": 7}
    base = tmp_path / "base"
    _checkpoint(base, **{"hf_conversion.json": {"special_token_ids": moved}})
    run = tmp_path / "run"
    _checkpoint(run, **{"run_state.json": {"args": {"load": str(base)}}})
    args, cfg = argparse.Namespace(model="tiny", **SIZES), get_config("tiny")
    for load in (base, run):
        with pytest.raises(TokenizerMismatchError, match="<\\|im_end\\|> is 2, not 7"):
            check_checkpoint_fits(str(load), args, cfg, tokenizer)


def test_fingerprint_differences_say_what_differs(tokenizer):
    recorded = tokenizer.fingerprint()
    assert fingerprint_differences(recorded, tokenizer.fingerprint()) == []
    assert fingerprint_differences({"vocab_size": 600}, recorded) == [
        f"{tokenizer.vocab_size} tokens, not 600"]
    shifted = {**recorded, "text_ids": [index + 1 for index in recorded["text_ids"]]}
    assert fingerprint_differences(shifted, recorded) == ["it splits the same text into other ids"]


def test_the_trainer_records_its_tokenizer(reference_run, tokenizer):
    record = json.loads((reference_run / "iter_0000008" / "run_state.json").read_text())
    assert record["tokenizer"] == tokenizer.fingerprint()


def test_a_resume_into_a_loader_built_another_way_is_refused(tmp_path, tokenizer):
    """energon restores a data position only into the same pipeline: a toggled --packing failed
    with 'Class name mismatch' from inside a loader worker, advised as a damaged shard."""
    saved = {"model": "tiny", **SIZES, "packing": True, "packing_buffer_size": None,
             "shuffle_buffer_size": 16}
    checkpoint = _checkpoint(tmp_path, **{"run_state.json": {"args": saved}})
    args, cfg = argparse.Namespace(**saved), get_config("tiny")
    check_checkpoint_fits(str(tmp_path), args, cfg, tokenizer, resuming=True)
    unpacked = argparse.Namespace(**{**saved, "packing": False})
    with pytest.raises(CheckpointLayoutError) as error:
        check_checkpoint_fits(str(tmp_path), unpacked, cfg, tokenizer, resuming=True)
    assert str(error.value).startswith(
        f"{checkpoint} holds the data position of a loader built with --packing: True; this run "
        "asks for --packing: False, and energon can restore a position only into a loader "
        "built the same way. Resume with the same data settings, or pass --finetune")
    check_checkpoint_fits(str(tmp_path), unpacked, cfg, tokenizer)  # weights only: no position
    # sizes may change (another --seq-length changes the packing buffer): the same stages
    resized = argparse.Namespace(**{**saved, "packing_buffer_size": 128, "shuffle_buffer_size": 8})
    check_checkpoint_fits(str(tmp_path), resized, cfg, tokenizer, resuming=True)


def test_a_resume_into_other_optimizer_groups_is_refused(tmp_path, tokenizer):
    """Another --lr-adapter or set of trainable modules makes other parameter groups: megatron
    failed deep in its loader ('Cannot merge two lists', a KeyError naming every tensor)."""
    saved = {"model": "tiny", **SIZES, "lr": 1e-3, "lr_vision": None, "lr_adapter": None,
             "trainable_modules": ["adapter", "language_model"]}
    checkpoint = _checkpoint(tmp_path, **{"run_state.json": {"args": saved}})
    cfg = get_config("tiny")
    # another --lr keeps the groups (the scheduler keeps the saved rate anyway)
    check_checkpoint_fits(str(tmp_path), argparse.Namespace(**{**saved, "lr": 2e-3}), cfg,
                          tokenizer, resuming=True)
    for change, now in (({"lr_adapter": 1e-2}, "adapter x10, language_model x1"),
                        ({"trainable_modules": ["vision_model", "adapter", "language_model"]},
                         "adapter x1, language_model x1, vision_model x1")):
        with pytest.raises(CheckpointLayoutError) as error:
            check_checkpoint_fits(str(tmp_path), argparse.Namespace(**{**saved, **change}), cfg,
                                  tokenizer, resuming=True)
        assert str(error.value).startswith(
            f"{checkpoint} holds the optimizer state of trainable modules adapter x1, "
            f"language_model x1 (learning rate relative to --lr); this run asks for {now}, and "
            "megatron restores optimizer state only into the same parameter groups")


# ------------------------------------------------------------------ the --save folder
def _complete(run, iteration, run_state=True):
    checkpoint = run / f"iter_{iteration:07d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    if run_state:
        (checkpoint / "run_state.json").write_text(json.dumps({"iteration": iteration}))
    return checkpoint


def _save_args(save, load=None, finetune=False):
    return argparse.Namespace(save=str(save), load=load and str(load), finetune=finetune)


def test_a_save_folder_with_later_checkpoints_is_refused(tmp_path):
    """A fresh run would overwrite another run's checkpoints and metrics; a resume from an
    earlier checkpoint (a rollback) would save between the later ones, which --keep-last then
    keeps and a restart resumes. A damaged newest checkpoint (no run_state.json) would be
    loaded as a base model: fresh, over the run."""
    from megatron_patch.training.checkpoint_match import SaveFolderInUse, check_save_folder
    save = tmp_path / "run"
    check_save_folder(_save_args(save))                     # a new folder
    _complete(save, 2)
    check_save_folder(_save_args(save, load=save))          # resuming the newest
    with pytest.raises(SaveFolderInUse, match=f"--save {save} already holds checkpoints up to "
                       f"iteration 2, and this run starts at iteration 0: it would overwrite "
                       f"them and their metrics. Resume that run with --load {save}"):
        check_save_folder(_save_args(save))
    with pytest.raises(SaveFolderInUse, match="Resume that run"):
        check_save_folder(_save_args(save, load=save, finetune=True))
    _complete(save, 4)
    with pytest.raises(SaveFolderInUse, match=f"--load {save}/iter_0000002 resumes at iteration "
                       f"2, and --save {save} holds later checkpoints \\(iter_0000004\\): the run "
                       "would save between them"):
        check_save_folder(_save_args(save, load=save / "iter_0000002"))
    damaged = _complete(save, 6, run_state=False)
    with pytest.raises(SaveFolderInUse, match=f"{damaged} has no run_state.json \\(damaged, or a "
                       "base model put there\\) and cannot be resumed: move it out"):
        check_save_folder(_save_args(save, load=save))


def test_a_resume_into_other_data_is_refused(tmp_path, tokenizer, converted_demo):
    """The saved data position counts into the data it was saved with: re-converted with more
    samples a resume went on silently, with fewer it failed in a loader worker ('Index out of
    bounds'). A moved dataset is the same data."""
    import shutil

    from megatron_patch.data.blends import train_data_fingerprint
    saved = {"model": "tiny", **SIZES}
    checkpoint = _checkpoint(tmp_path / "run", **{"run_state.json": {
        "args": saved, "data": train_data_fingerprint(str(converted_demo))}})
    cfg = get_config("tiny")
    moved = shutil.copytree(converted_demo, tmp_path / "moved")
    check_checkpoint_fits(str(tmp_path / "run"), argparse.Namespace(**saved, data_path=str(moved)),
                          cfg, tokenizer, resuming=True)
    info = moved / ".nv-meta" / ".info.json"
    counts = json.loads(info.read_text())
    train_shard = sorted(counts["shard_counts"])[0]
    counts["shard_counts"][train_shard] += 30  # re-converted from more records
    info.write_text(json.dumps(counts))
    changed = argparse.Namespace(**saved, data_path=str(moved))
    with pytest.raises(CheckpointLayoutError, match=(
            f"--data-path {moved} is not the data {checkpoint} was trained on: its train split "
            r"had 108 samples in 1 shards, now 138 samples in 1 shards. Its data position cannot "
            "be resumed into other data")):
        check_checkpoint_fits(str(tmp_path / "run"), changed, cfg, tokenizer, resuming=True)
    check_checkpoint_fits(str(tmp_path / "run"), changed, cfg, tokenizer)  # weights only


def test_the_trainer_records_its_data(reference_run, converted_demo):
    from megatron_patch.data.blends import train_data_fingerprint
    record = json.loads((reference_run / "iter_0000008" / "run_state.json").read_text())
    assert record["data"] == train_data_fingerprint(str(converted_demo))
    assert record["data"]["train_samples"] == 108

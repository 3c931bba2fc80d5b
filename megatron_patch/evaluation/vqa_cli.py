"""`tools/evaluate_vqa.py`: load a checkpoint, answer the val split greedily, print accuracy per
question type (and write it as JSON with --json)."""
import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch

from megatron_patch.checkpoint_conversion.record import find_record
from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.sft_loader import has_split
from megatron_patch.data.shard_scan import read_split_layout
from megatron_patch.data.tokenizer import SFTTokenizer
from megatron_patch.evaluation.vqa import GreedyAnswerer, evaluate
from megatron_patch.model import build_model
from megatron_patch.training.arguments import (MODEL_OVERRIDE_KEYS, add_model_override_arguments,
                                                positive_int)
from megatron_patch.training.checkpoint_match import check_checkpoint_fits
from megatron_patch.training.checkpoint_paths import choose_checkpoint
from megatron_patch.training.checkpointing import (CheckpointLayoutError, load_checkpoint,
                                                   read_run_state)
from megatron_patch.training.components import model_config
from megatron_patch.training.parallel_setup import initialize, shutdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--load", required=True, help="a run dir (newest checkpoint) or one iter_* dir")
    p.add_argument("--data-path", required=True, help="converted dataset dir")
    p.add_argument("--tokenizer-path", required=True)
    p.add_argument("--model", help="default: the run's (recorded in its checkpoint), else tiny")
    add_model_override_arguments(p, "default: the run's, as given to the trainer")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=positive_int, help="stop after this many questions")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--min-pixels", type=int, help="default: the run's, else the trainer's")
    p.add_argument("--max-pixels", type=int, help="default: the run's, else the trainer's")
    p.add_argument("--attention-backend", choices=("auto", "te", "local"), default="auto")
    p.add_argument("--json", help="also write the accuracies here")
    return p


class EvaluationInputError(ValueError):
    """The split or checkpoint asked for is not there: said in one line, not a traceback."""


def check_split(data_path: str, split: str) -> None:
    """A converted dataset folder has `split` and it holds shards, a blend (a metadataset .yaml)
    names a blend for it: energon would fail with an assertion, 'No shards found' or a
    KeyError."""
    if not os.path.isdir(data_path):
        if not os.path.exists(data_path):
            raise EvaluationInputError(f"--data-path {data_path} does not exist")
        if not has_split(data_path, split):
            raise EvaluationInputError(f"--data-path {data_path} has no {split!r} blend: add "
                                       f"'{split}:' to its splits, or evaluate one member's folder")
        return
    layout = read_split_layout(data_path)
    if split not in layout:
        raise EvaluationInputError(f"--data-path {data_path} has no split {split!r} (it has "
                                   f"{', '.join(sorted(layout))}); pass --split")
    if not layout[split]:
        filled = [name for name, shards in sorted(layout.items()) if shards]
        raise EvaluationInputError(
            f"split {split!r} of {data_path} has no shards (the converter's --split gave it "
            f"none); evaluate another split ({', '.join(filled)}) or reconvert with a share for it")


def chosen_checkpoint(load: str) -> str:
    """The checkpoint `--load` names (see checkpoint_paths.choose_checkpoint), or why none."""
    if not os.path.exists(load):
        raise EvaluationInputError(f"--load {load} does not exist")
    choice = choose_checkpoint(load)
    if choice.path is None:
        raise EvaluationInputError(f"--load {load}: no complete checkpoint there"
                                   + "".join(f"; {note}" for note in choice.notes))
    return choice.path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return evaluate_checkpoint(args)
    except (EvaluationInputError, CheckpointLayoutError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


# what the evaluator takes from the run when not given: the model it built and the image sizes
# it trained at (other sizes score lower without a word: 31.9% instead of 34.5% measured)
RUN_SETTINGS = ("model", *MODEL_OVERRIDE_KEYS, "min_pixels", "max_pixels")
DEFAULTS = {"model": "tiny", "min_pixels": ImageGeometry.min_pixels,
            "max_pixels": ImageGeometry.max_pixels}


def settings_from_the_run(args, checkpoint: str) -> List[str]:
    """Fills the settings left out with the run's recorded ones (else the defaults); returns a
    note for each one given that differs from the run's."""
    recorded = (read_run_state(checkpoint) or {}).get("args") or {}
    if "model" not in recorded:  # a converted base model records its preset
        recorded = {"model": (find_record(checkpoint)[0] or {}).get("model"), **recorded}
    notes = []
    for name in RUN_SETTINGS:
        given, trained = getattr(args, name), recorded.get(name)
        if given is None:
            setattr(args, name, trained if trained is not None else DEFAULTS.get(name))
        elif trained is not None and given != trained:
            notes.append(f"note: --{name.replace('_', '-')} {given} differs from the run's "
                         f"{trained}")
    return notes


def evaluate_checkpoint(args) -> int:
    if args.json and (os.path.isdir(args.json)
                      or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        raise EvaluationInputError(f"--json {args.json}: give a file path in an existing folder")
    check_split(args.data_path, args.split)
    checkpoint = chosen_checkpoint(args.load)
    for note in settings_from_the_run(args, checkpoint):
        print(note, file=sys.stderr)
    tokenizer = SFTTokenizer(args.tokenizer_path)
    cfg = model_config(args, tokenizer)
    check_checkpoint_fits(checkpoint, args, cfg, tokenizer)  # before building
    ranks = initialize(1, 1, seed=0)
    try:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model = build_model(cfg, attention_backend=args.attention_backend,
                            use_cpu_initialization=True, perform_initialization=False)
        load_checkpoint(checkpoint, [model], None, None, ranks, weights_only=True)
        model.to(device).eval()
        answerer = GreedyAnswerer(model, tokenizer, ImageGeometry(min_pixels=args.min_pixels,
                                                                  max_pixels=args.max_pixels),
                                  device, args.max_new_tokens)
        scores = evaluate(answerer, args.data_path, args.split, args.limit)
    finally:
        shutdown()
    print(f"checkpoint {checkpoint}, split {args.split}")
    print(scores.table())
    for key, kind, reference, got in scores.examples[:5]:
        print(f"  wrong: {key} [{kind}] expected {reference!r}, got {got!r}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": checkpoint, "data_path": args.data_path, "split": args.split,
                       "limit": args.limit, "accuracy": scores.accuracy(),
                       "correct": dict(scores.correct), "total": dict(scores.total)},
                      handle, indent=1)
    return 0

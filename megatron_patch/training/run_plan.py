"""The launcher's arithmetic: data-parallel size, global batch, steps, warmup, save interval.

Kept in Python (not bash) so it is tested table-driven; `train/sft_bench_TEMPLATE.sh` runs
`python -m megatron_patch.training.run_plan ...` and reads its KEY=VALUE lines.

Units: SAMPLES counts converted samples (one conversation each) in the train split; GBS counts
sequences per optimizer step. Without packing a sequence is one sample. With --packing (in the
trainer arguments) a sequence holds several, so the plan estimates SAMPLES_PER_SEQUENCE from the
first train samples (packing_estimate.py) and NSTEP = ceil(SAMPLES x EPOCHS / (GBS x that)).
"""
import argparse
import difflib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from megatron_patch.data.blends import blend_members, is_blend
from megatron_patch.data.tokenizer import SFTTokenizer


@dataclass
class RunPlan:
    world_size: int
    data_parallel_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    samples: int
    train_iters: int
    warmup_iters: int
    save_interval: int
    samples_per_sequence: float = 1.0
    notes: List[str] = field(default_factory=list)


def plan_run(samples: int, world_size: int, tp: int = 1, pp: int = 1, micro_batch: int = 1,
             global_batch: Optional[int] = None, gbs_per_dp: int = 4, epochs: float = 1.0,
             margin: float = 0.05, warmup_fraction: float = 0.002, saves_per_run: int = 10,
             save_interval: Optional[int] = None, samples_per_sequence: float = 1.0) -> RunPlan:
    if world_size % (tp * pp):
        raise ValueError(f"TP x PP = {tp} x {pp} does not divide the {world_size} GPUs; choose TP "
                         f"and PP whose product divides {world_size}")
    dp = world_size // (tp * pp)
    unit = micro_batch * dp
    notes = []
    requested = global_batch if global_batch else gbs_per_dp * dp
    gbs = max(unit, round(requested / unit) * unit)
    if gbs != requested:
        notes.append(f"GBS {requested} rounded to {gbs}, a multiple of MBS x DP = {micro_batch} x {dp}")
    if samples <= 0:
        raise ValueError("the train split has no samples")
    if samples_per_sequence <= 0:
        raise ValueError(f"samples per sequence must be positive, not {samples_per_sequence}")
    steps = math.ceil(samples * epochs / (gbs * samples_per_sequence))
    train_iters = math.ceil(steps * (1 + margin))
    warmup = max(1, round(train_iters * warmup_fraction)) if warmup_fraction > 0 else 0
    warmup = min(warmup, train_iters - 1)  # the decay needs a step after it
    interval = save_interval or max(1, math.ceil(train_iters / saves_per_run))
    if samples_per_sequence != 1:
        notes.append(f"packing: ~{samples_per_sequence:.2f} samples per sequence, so a step of "
                     f"GBS {gbs} sequences trains on ~{gbs * samples_per_sequence:.0f} samples")
    return RunPlan(world_size, dp, gbs, gbs // unit, samples, train_iters, warmup, interval,
                   samples_per_sequence, notes)


def count_train_samples(data_path: str) -> int:
    """Train samples of a converted dir (our manifest, else energon's own index) or a blend yaml."""
    if is_blend(data_path):
        return sum(count_train_samples(member) for member, _ in blend_members(data_path))
    meta = os.path.join(data_path, ".nv-meta")
    manifest = os.path.join(meta, "llava_manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as handle:
            return int(json.load(handle)["samples"]["train"])
    info, split = os.path.join(meta, ".info.json"), os.path.join(meta, "split.yaml")
    if not (os.path.isfile(info) and os.path.isfile(split)):
        raise FileNotFoundError(f"{data_path} has no .nv-meta index (convert it with "
                                "tools/stage2_sftdata2webdataset.py)")
    from megatron_patch.data.shard_scan import read_split_layout
    with open(info) as handle:
        counts = json.load(handle)["shard_counts"]
    return sum(counts[name] for name in read_split_layout(data_path).get("train", []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print the launch plan as KEY=VALUE lines")
    p.add_argument("--data-path", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--gbs", type=int, default=0, help="0: GBS_PER_DP x DP")
    p.add_argument("--gbs-per-dp", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--warmup-fraction", type=float, default=0.002)
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--samples-per-sequence", default="auto",
                   help="samples per packed sequence; auto: 1 without --packing in "
                        "--trainer-args, else estimated from the data")
    p.add_argument("--tokenizer-path", help="for the packing estimate")
    p.add_argument("--trainer-args", default="", help="the trainer's extra arguments, one string")
    p.add_argument("--extra-args", default="",
                   help="the user's part of them (the template's EXTRA_ARGS), one string")
    args = p.parse_args(argv)
    try:
        if args.epochs <= 0:
            raise ValueError(f"EPOCHS must be positive, got {args.epochs}")
        check_trainer_args(shlex.split(args.trainer_args))
        check_not_template_owned(shlex.split(args.extra_args))
        if args.tokenizer_path:
            SFTTokenizer(args.tokenizer_path)  # found, readable, with the chat's special tokens
        samples = count_train_samples(args.data_path)
        per_sequence, estimate_note = samples_per_sequence(args)
        plan = plan_run(samples, args.world_size, args.tp, args.pp, args.mbs, args.gbs or None,
                        args.gbs_per_dp, args.epochs, args.margin, args.warmup_fraction,
                        save_interval=args.save_interval or None,
                        samples_per_sequence=per_sequence)
        check_trainer_settings(shlex.split(args.trainer_args), plan, args.tp, args.pp, args.mbs)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"PLAN_ERROR={one_line(error)}")
        return 1
    if estimate_note:
        plan.notes.append(estimate_note)
    values = asdict(plan)
    for note in values.pop("notes"):
        print(f"PLAN_NOTE={one_line(note)}")
    names = {"world_size": "WORLD_SIZE_PLAN", "data_parallel_size": "DP", "global_batch_size": "GBS",
             "gradient_accumulation_steps": "GRAD_ACC", "samples": "SAMPLES",
             "train_iters": "NSTEP", "warmup_iters": "WARMUP", "save_interval": "SAVE_INTERVAL",
             "samples_per_sequence": "SAMPLES_PER_SEQUENCE"}
    for key, value in values.items():
        print(f"{names[key]}={value}")
    return 0


def one_line(message) -> str:
    """A message as the launcher prints it after its KEY=: one line, as written."""
    return " ".join(str(message).split())


def check_trainer_args(trainer_args) -> argparse.Namespace:
    """The launcher's extra trainer arguments, parsed by the trainer's own parser now rather
    than after torchrun has started: a ValueError naming an unknown flag (with the closest known
    one) or a bad value."""
    from megatron_patch.training.arguments import build_parser
    parser = build_parser()
    parser.exit_on_error = False
    required = ["--train-iters", "1", "--data-path", "-", "--tokenizer-path", "-"]
    try:
        parsed, unknown = parser.parse_known_args(required + list(trainer_args))
    except argparse.ArgumentError as error:
        raise ValueError(f"EXTRA_ARGS: {error}") from None
    flags = [item for item in unknown if item.startswith("-")]
    if flags:
        known = [option for action in parser._actions for option in action.option_strings]
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        raise ValueError(f"EXTRA_ARGS: unknown trainer flag(s) {', '.join(hints)}; "
                         "python train/pretrain_llava_ov.py --help lists them")
    return parsed


def check_trainer_settings(trainer_args, plan: RunPlan, tp: int, pp: int, mbs: int) -> None:
    """The trainer's own validation of the settings the template will launch with (the plan's
    and EXTRA_ARGS), once, here: after torchrun has started, each rank would print the refusal
    and torchrun its own traceback. Paths and the model's shapes are the preflight's."""
    from megatron_patch.training.arguments import ArgumentError, validate_args
    launched = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
                str(pp), "--micro-batch-size", str(mbs), "--global-batch-size",
                str(plan.global_batch_size), "--lr-warmup-iters", str(plan.warmup_iters)]
    args = check_trainer_args(launched + list(trainer_args))
    args.train_iters = plan.train_iters
    try:
        validate_args(args, plan.world_size, check_paths=False)
    except ArgumentError as error:
        message = str(error).removeprefix("error: ")
        named = [f"{flag} is {variable}" for flag, variable in TEMPLATE_OWNED_FLAGS.items()
                 if re.search(re.escape(flag) + r"(?![\w-])", message)]
        raise ValueError(f"the trainer would refuse these settings: {message}"
                         + (f" (in the template, {'; '.join(named)})" if named else "")) from None


# the trainer flags the template sets itself, and the [EDIT] variable each comes from: given in
# EXTRA_ARGS too, one would silently win over the plan (--train-iters) or clash with the
# template's (--lr-warmup-fraction against its --lr-warmup-iters)
TEMPLATE_OWNED_FLAGS = {
    "--model": "MODEL", "--tensor-model-parallel-size": "TP",
    "--pipeline-model-parallel-size": "PP", "--seq-length": "SEQ_LEN",
    "--micro-batch-size": "MBS", "--global-batch-size": "GBS (or GBS_PER_DP)",
    "--train-iters": "EPOCHS (the plan turns it into NSTEP)", "--lr": "LR", "--min-lr": "MIN_LR",
    "--lr-warmup-iters": "WARMUP_FRACTION", "--lr-warmup-fraction": "WARMUP_FRACTION",
    "--data-path": "DATA_PATH", "--tokenizer-path": "TOKENIZER_PATH",
    "--num-workers": "NUM_WORKERS", "--save": "SAVE_CKPT_PATH", "--save-interval": "SAVE_INTERVAL",
    "--exit-signals": "EXIT_SIGNALS", "--load": "CHECKPOINT_PATH (or RESUME)",
    "--finetune": "CHECKPOINT_PATH",
}


def check_not_template_owned(extra_args) -> None:
    """A ValueError naming each EXTRA_ARGS flag the template sets itself, with its variable."""
    owned = [flag for flag in (item.split("=")[0] for item in extra_args)
             if flag in TEMPLATE_OWNED_FLAGS]
    if owned:
        raise ValueError("EXTRA_ARGS: " + "; ".join(
            f"{flag} is the template's own (set {TEMPLATE_OWNED_FLAGS[flag]} instead)"
            for flag in dict.fromkeys(owned)))


def samples_per_sequence(args) -> tuple:
    """(samples per sequence, a note on how it was found or None)."""
    trainer_args = shlex.split(args.trainer_args)
    if "--packing" not in trainer_args:
        if args.samples_per_sequence not in ("auto", "1", "1.0"):
            raise ValueError(f"SAMPLES_PER_SEQUENCE={args.samples_per_sequence} applies to "
                             "--packing only (without it each sequence holds one sample): add "
                             "--packing to EXTRA_ARGS or leave it auto")
        return 1.0, None
    if args.samples_per_sequence != "auto":
        return float(args.samples_per_sequence), None
    if not args.tokenizer_path:
        return 1.0, ("--packing: samples per sequence not estimated (needs the tokenizer); NSTEP "
                     "counts sequences as if each held one sample -- set SAMPLES_PER_SEQUENCE")
    from megatron_patch.training.packing_estimate import estimate_from_trainer_args
    estimate = estimate_from_trainer_args(args.data_path, args.tokenizer_path, trainer_args)
    read = (f"{estimate.samples_read} train samples, each member's first in the blend's "
            "proportions," if is_blend(args.data_path)
            else f"the first {estimate.samples_read} train samples")
    return round(estimate.samples_per_sequence, 2), (
        f"estimated from {read} packed as the trainer packs them "
        f"({100 * estimate.efficiency:.1f}% of each sequence filled, {estimate.overlong} longer "
        "than the sequence, read but dropped unless --overlong truncate)")


if __name__ == "__main__":
    sys.exit(main())

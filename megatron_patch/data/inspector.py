"""Inspecting a converted dataset, top-down:

    split list + manifest + .tar.idx checks (always; cheap)
    -> read every tar of the chosen splits directly, cook each sample with the trainer's cooker,
       open its images (fully decoded with `validate`), accumulate statistics
    -> with `validate`: read each split once more through energon (the trainer's loader) and
       check it yields as many samples as the tars hold

Every finding is a `Problem` naming its shard and sample; nothing stops at the first one.
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from tqdm import tqdm

from megatron_patch.data.blends import is_blend, dataset_folders
from megatron_patch.data.energon_reader import iter_split_samples
from megatron_patch.data.inspect_stats import DatasetStats, TokenCounter
from megatron_patch.data.sample_check import CheckedSample, check_sample
from megatron_patch.data.shard_scan import (UNINDEXED, Problem, check_shard_files,
                                            idx_sample_count, iter_shard, load_manifest,
                                            read_split_layout)


@dataclass
class InspectOptions:
    splits: Optional[List[str]] = None     # None: every split
    validate: bool = False
    keep_samples: int = 0                  # how many first samples to keep for --show / --html
    tokens: Optional[TokenCounter] = None
    seq_length: Optional[int] = None
    progress: bool = True


@dataclass
class InspectReport:
    stats: dict
    problems: List[Problem]
    samples: List[CheckedSample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_dataset(dataset_dir: str, options: InspectOptions) -> InspectReport:
    started = time.perf_counter()
    if not os.path.isdir(dataset_dir):
        if is_blend(dataset_dir):
            raise ValueError(f"{dataset_dir} is a blend: inspect each dataset folder it names "
                             f"({', '.join(dataset_folders(dataset_dir))})")
        raise FileNotFoundError(f"{dataset_dir} is not a directory")
    layout = read_split_layout(dataset_dir)
    unknown = sorted(set(options.splits or ()) - set(layout))
    if unknown:
        raise ValueError(f"split(s) {unknown} not in the dataset (it has {sorted(layout)})")
    chosen = {split: names for split, names in layout.items()
              if options.splits is None or split in options.splits}
    manifest = load_manifest(dataset_dir)
    problems = check_shard_files(dataset_dir, layout, manifest)
    stats = DatasetStats(options.tokens, options.seq_length)
    kept: List[CheckedSample] = []
    cooked = {}
    expected = _expected_samples(dataset_dir, chosen, manifest)
    with tqdm(total=sum(expected.values()), unit=" samples", desc="inspecting",
              disable=not options.progress, file=sys.stderr) as bar:
        for split, names in chosen.items():
            for name in names:
                path = os.path.join(dataset_dir, name)
                if not os.path.isfile(path):
                    continue  # already a Problem from check_shard_files
                stats.add_shard(split, expected.get(name, 0), os.path.getsize(path))
                for raw in iter_shard(path, problems):
                    checked = check_sample(raw, full_decode=options.validate)
                    problems.extend(checked.problems)
                    stats.add_sample(split, checked, list(raw.parts))
                    if checked.sample is not None:  # energon would skip the others
                        cooked[split] = cooked.get(split, 0) + 1
                    if len(kept) < options.keep_samples:
                        kept.append(checked)
                    bar.update(1)
    if options.validate:
        problems.extend(_energon_cross_check(dataset_dir, chosen, cooked, problems))
    report = InspectReport(stats.as_dict(), problems, kept)
    report.stats["seconds"] = report.seconds = round(time.perf_counter() - started, 3)
    report.stats["problems"] = len(problems)
    return report


def _expected_samples(dataset_dir: str, chosen: dict, manifest: Optional[dict]) -> dict:
    """Samples per shard from the manifest, else from energon's index (for progress and counts)."""
    recorded = (manifest or {}).get("shards", {})
    expected = {}
    for names in chosen.values():
        for name in names:
            count = recorded.get(name, {}).get("samples")
            if count is None:
                count = idx_sample_count(os.path.join(dataset_dir, name)) or 0
            expected[name] = count
    return expected


def _energon_cross_check(dataset_dir: str, chosen: dict, cooked: dict,
                         known: List[Problem]) -> List[Problem]:
    """Reads each split through energon with a collecting error handler: the trainer must see
    every sample the tars hold. Findings already made by the direct scan are not repeated."""
    problems = []
    known_keys = {(p.shard, p.key) for p in known}
    for split, names in chosen.items():
        if split == UNINDEXED or not names:
            continue
        errors = []

        def collect(error, sample, sources=None):
            shard = next((getattr(s, "shard_name", "") for s in sources or ()), "")
            key = sample.get("__key__", "") if isinstance(sample, dict) else \
                getattr(sample, "__key__", "")
            errors.append(Problem(os.path.basename(str(shard)), str(key),
                                  f"energon: {type(error).__name__}: {error}"))

        count = 0
        try:
            # energon prints each failure on stdout; `collect` already has it, keep stdout clean
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                for _ in iter_split_samples(dataset_dir, split, on_error=collect):
                    count += 1
        except Exception as error:
            problems.append(Problem("", "", f"energon stopped reading split '{split}' after "
                                            f"{count} samples: {type(error).__name__}: {error}"))
            continue
        problems.extend(p for p in errors if (p.shard, p.key) not in known_keys)
        if count != cooked.get(split, 0):
            problems.append(Problem("", "", f"energon yields {count} samples of split '{split}', "
                                            f"the tars hold {cooked.get(split, 0)} readable ones"))
    return problems

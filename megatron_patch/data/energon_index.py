"""Making energon's `.nv-meta` index for converted shards, through energon's own Python API.

We write `dataset.yaml` ourselves (energon's prepare API writes the rest) and pass explicit
per-shard split patterns, because energon's ratio split shuffles and assigns whole tars, which
would not honour our per-sample split. Our manifest (sizes and sample counts per shard) sits beside
energon's files: energon does not notice tars changed after prepare, so readers check it.
"""
import json
import os
import re
import shutil

import yaml

from megatron_patch.data.shard_format import MANIFEST_NAME, SPLITS

META_DIR = ".nv-meta"
DATASET_YAML = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}
_MATCH_NOTHING = "(?!)"


def write_energon_index(output_dir: str, shards: list, workers: int = 2) -> None:
    """`shards` are ShardInfo-like objects (name, split, samples, bytes), already in place."""
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    meta = os.path.join(output_dir, META_DIR)
    shutil.rmtree(meta, ignore_errors=True)  # a stale partial index misleads energon
    patterns = []
    for split in SPLITS:
        names = [re.escape(s.name) for s in shards if s.split == split]
        patterns.append((split, f"^(?:{'|'.join(names)})$" if names else _MATCH_NOTHING))
    try:
        BaseWebdatasetFactory.prepare_dataset(
            output_dir, [s.name for s in shards], split_parts_patterns=patterns,
            shuffle_seed=None, workers=max(1, min(workers, len(shards))))
        manifest = {
            "format_version": 1,
            "samples": {split: sum(s.samples for s in shards if s.split == split) for split in SPLITS},
            "shards": {s.name: {"split": s.split, "samples": s.samples, "bytes": s.bytes}
                       for s in shards},
        }
        with open(os.path.join(meta, MANIFEST_NAME), "w") as handle:
            json.dump(manifest, handle, indent=1)
        # dataset.yaml last: without it energon refuses the folder, so a crash above is visible
        with open(os.path.join(meta, "dataset.yaml"), "w") as handle:
            yaml.safe_dump(DATASET_YAML, handle, sort_keys=False)
    except BaseException:
        shutil.rmtree(meta, ignore_errors=True)
        raise

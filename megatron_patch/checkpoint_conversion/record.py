"""The conversion record: what an exported checkpoint should look like, remembered at import.

``convert_hf_to_mcore`` writes ``hf_conversion.json`` into the base checkpoint it creates
(source config.json, key layout, dtype, model config). A fine-tuned run's checkpoints do not
carry it, but their ``run_state.json`` names the ``--load`` they started from; following that
chain back finds the record, so ``convert_mcore_to_hf`` can write the user's fine-tuned model
with the *source* checkpoint's config.json, key names and dtype without being told again.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from megatron_patch.training import checkpoint_paths

RECORD_NAME = "hf_conversion.json"
RUN_STATE_NAME = "run_state.json"  # written by training.checkpointing into run checkpoints
_MAX_CHAIN = 16


def write_record(checkpoint_dir: str, record: Dict[str, Any]) -> None:
    with open(os.path.join(checkpoint_dir, RECORD_NAME), "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.write("\n")


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def find_record(checkpoint_dir: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(record, the iter dir holding it) for ``checkpoint_dir`` or the checkpoint its run loaded."""
    seen = set()
    current: Optional[str] = checkpoint_dir
    for _ in range(_MAX_CHAIN):
        if current is None or os.path.realpath(current) in seen:
            break
        seen.add(os.path.realpath(current))
        record = _read_json(os.path.join(current, RECORD_NAME))
        if record is not None:
            return record, current
        run_state = _read_json(os.path.join(current, RUN_STATE_NAME)) or {}
        load = (run_state.get("args") or {}).get("load")
        if not load or not os.path.exists(load):
            break
        try:
            current = checkpoint_paths.choose_checkpoint(load).path
        except FileNotFoundError:
            break
    return None, None


def run_args(checkpoint_dir: str) -> Dict[str, Any]:
    """The trainer arguments of the run that wrote ``checkpoint_dir`` ({} for a base model)."""
    return (_read_json(os.path.join(checkpoint_dir, RUN_STATE_NAME)) or {}).get("args") or {}


def run_model_config(checkpoint_dir: str) -> Optional[Dict[str, Any]]:
    """The resolved model config the trainer logged in its run directory (run_config.json)."""
    run_config = _read_json(os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)),
                                         "run_config.json"))
    return (run_config or {}).get("model")

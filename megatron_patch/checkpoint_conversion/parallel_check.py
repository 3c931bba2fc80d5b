"""Can a model be split at TP=N / PP=M? Answered from the mapping table before any work.

The converters write TP/PP-independent dist-checkpoints (see ``runtime``), so ``--tp``/``--pp``
do not change the files; they say how the user will train, and a layout megatron cannot build
(8 KV heads at TP=3, 36 layers at PP=5) should fail here, in seconds, naming the tensors and
counts at fault -- not after a multi-GB conversion, at the trainer's first model build.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from megatron_patch.checkpoint_conversion.errors import raise_if_problems
from megatron_patch.model import hf_mapping
from megatron_patch.model.configs import LlavaOVConfig


def parallel_layout_problems(cfg: LlavaOVConfig, shapes: Dict[str, Sequence[int]], tp: int,
                             pp: int) -> List[str]:
    problems: List[str] = []
    if tp < 1 or pp < 1:
        return [f"TP and PP must be >= 1 (got TP={tp}, PP={pp})"]
    lm, vi = cfg.language, cfg.vision
    for what, count, size, name in (
            ("language attention heads", lm.num_attention_heads, tp, "TP"),
            ("language query groups (KV heads)", lm.num_query_groups, tp, "TP"),
            ("vision attention heads", vi.num_attention_heads, tp, "TP")):
        if count % size:
            problems.append(f"{what} ({count}) not divisible by {name}={size}")
    uneven = (cfg.num_layers_in_first_pipeline_stage, cfg.num_layers_in_last_pipeline_stage)
    if uneven == (None, None) and lm.num_layers % pp:
        problems.append(f"language layers ({lm.num_layers}) not divisible by PP={pp}")
    for item in hf_mapping.items(cfg):
        if item.tp_dim is None or item.mcore not in shapes:
            continue
        extent = shapes[item.mcore][item.tp_dim]
        if item.fuse == "gate_up":
            extent //= 2  # each rank takes its chunk of gate and of up
        if extent % tp:
            problems.append(f"{item.mcore}: dim {item.tp_dim} of {tuple(shapes[item.mcore])} "
                            f"not divisible by TP={tp}")
    return problems


def check_parallel_layout(cfg: LlavaOVConfig, shapes: Dict[str, Sequence[int]], tp: int, pp: int) -> None:
    raise_if_problems(f"model {cfg.name} cannot be split at TP={tp}, PP={pp}",
                      [("problems", parallel_layout_problems(cfg, shapes, tp, pp))])

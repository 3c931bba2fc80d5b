"""Launcher preflight checks that need the model config: divisibility by TP/PP and free disk.

Each failure is one line with the fix, exit status 1. Called by train/sft_bench_TEMPLATE.sh.
"""
import argparse
import os
import shutil
import sys

from megatron_patch.model.configs import get_config
from megatron_patch.sizes import human_bytes
from megatron_patch.training.arguments import ArgumentError, check_model_divisibility

# bf16 weights + fp32 master copy + two fp32 Adam moments, per parameter
BYTES_PER_PARAM_WITH_OPTIMIZER = 2 + 4 + 4 + 4


def approximate_parameters(config) -> int:
    """Parameter count from the config (embeddings, decoder, vision tower), close enough for disk."""
    lm, vi = config.language, config.vision
    q, kv = lm.num_attention_heads * lm.head_dim, lm.num_query_groups * lm.head_dim
    layer = lm.hidden_size * (q + 2 * kv) + q * lm.hidden_size + 3 * lm.hidden_size * lm.ffn_hidden_size
    language = lm.num_layers * layer + 2 * lm.vocab_size * lm.hidden_size
    vision = vi.num_layers * (4 * vi.hidden_size ** 2 + 2 * vi.hidden_size * vi.ffn_hidden_size)
    return language + vision


def check(model: str, tp: int, pp: int, save: str) -> list:
    config = get_config(model)
    problems = []
    try:
        check_model_divisibility(config, tp, pp)
    except ArgumentError as error:
        problems.append(f"{model}: {str(error).removeprefix('error: ')}")
    needed = approximate_parameters(config) * BYTES_PER_PARAM_WITH_OPTIMIZER
    target = save
    while not os.path.exists(target):
        target = os.path.dirname(target) or "."
    free = shutil.disk_usage(target).free
    if free < needed:
        problems.append(f"{save}: {human_bytes(free)} free, one checkpoint of {model} needs "
                        f"about {human_bytes(needed)}; free space or choose another "
                        "SAVE_CKPT_PATH")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--save", required=True)
    args = p.parse_args(argv)
    try:
        problems = check(args.model, args.tp, args.pp, args.save)
    except (KeyError, ValueError) as error:
        problems = [f"model {args.model!r}: {error}"]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Exact-match VQA accuracy per question type of a checkpoint on a converted split (greedy).

    python tools/evaluate_vqa.py --load RUN_DIR --data-path DATA --tokenizer-path TOK --model tiny
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.evaluation.vqa_cli import main

    sys.exit(main())

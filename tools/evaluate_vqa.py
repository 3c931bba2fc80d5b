"""Exact-match VQA accuracy per question type of a checkpoint on a converted split (greedy).

    python tools/evaluate_vqa.py --load RUN_DIR --data-path DATA --tokenizer-path TOK --model tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.evaluation.vqa_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

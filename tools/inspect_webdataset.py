"""Inspect a converted dataset: counts, parts, images, token lengths; --validate; --show; --html.

    python tools/inspect_webdataset.py DIR [--validate] [--show N] [--html FILE]
        [--tokenizer DIR] [--seq-length L] [--max-pixels P] [--split train|val|all] [--json]
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.data.inspect_cli import main

    sys.exit(main(sys.argv[1:]))

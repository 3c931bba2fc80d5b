"""Inspect a converted dataset: counts, parts, images, token lengths; --validate; --show; --html.

    python tools/inspect_webdataset.py DIR [--validate] [--show N] [--html FILE]
        [--tokenizer DIR] [--seq-length L] [--max-pixels P] [--split train|val|all] [--json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.inspect_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the synthetic coloured-shapes VQA dataset (LLaVA JSON + PNGs) for the CPU demo.

    python tools/make_demo_dataset.py --output-dir DIR [--num-samples N] [--seed S]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.demo_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the synthetic coloured-shapes VQA dataset (LLaVA JSON + PNGs) for the CPU demo.

    python tools/make_demo_dataset.py --output-dir DIR [--num-samples N] [--seed S]
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.data.demo_dataset import main

    sys.exit(main(sys.argv[1:]))

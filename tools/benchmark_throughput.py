"""Training throughput (tokens/s, MFU/HFU, memory, data wait) of the megatron trainer and of a
plain-PyTorch baseline on the same batches; see megatron_patch/benchmarking/throughput.py.

    python tools/benchmark_throughput.py --model tiny --seq-length 1024 --trainer both --json out.json
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.benchmarking.throughput import main

    sys.exit(main(sys.argv[1:]))

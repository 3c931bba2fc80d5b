"""Throughput benchmarking: synthetic packed batches, the megatron trainer's step and a
plain-PyTorch baseline measured side by side (``tools/benchmark_throughput.py``)."""

"""Megatron checkpoint (any TP/PP, base model or training run) -> HF safetensors checkpoint.

    python tools/convert_mcore_to_hf.py --load SAVE_DIR|SAVE_DIR/iter_XXXXXXX --out HF_DIR
        [--model NAME] [--tokenizer-path DIR] [--dtype auto|bfloat16|float32]
        [--key-layout auto|flat|nested] [--max-shard-size 5GB] [--overwrite]
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.checkpoint_conversion.cli import mcore_to_hf_main

    sys.exit(mcore_to_hf_main(sys.argv[1:]))

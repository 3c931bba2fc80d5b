"""HF LLaVA-OneVision-1.5 checkpoint (safetensors) -> megatron base checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --out OUT [--model llava-ov-1.5-4b]
        [--tp N --pp M] [--dtype auto|bfloat16|float32] [--overwrite]

Then train with: train/pretrain_llava_ov.py --load OUT --tokenizer-path OUT ...
"""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method (megatron's
    # checkpoint writer starts one) re-imports this file, and need not import torch + megatron
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.checkpoint_conversion.cli import hf_to_mcore_main

    sys.exit(hf_to_mcore_main(sys.argv[1:]))

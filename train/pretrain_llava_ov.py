"""LLaVA-OneVision-1.5 SFT on megatron-core: the script torchrun launches.

    torchrun --nproc-per-node 8 train/pretrain_llava_ov.py --model llava-ov-1.5-4b \
        --data-path /data/sft --tokenizer-path /ckpt/tokenizer --load /ckpt/base \
        --save /runs/sft --train-iters 3000 --global-batch-size 224 ...

Arguments use Megatron-LM's names (`--help`); train/sft_bench_TEMPLATE.sh computes them for you.
The logic lives in megatron_patch/training/trainer.py.
"""
import gc
import os
import sys

if __name__ == "__main__":
    # Imported here, not at the top: megatron's checkpoint writer starts a process with the
    # "spawn" method, which re-imports this file; an import at the top cost that process 2-3 s of
    # torch + megatron before the first checkpoint could be written.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.training.trainer import main

    try:
        code = main()
    finally:
        # Every object out of the collector's reach: the interpreter's teardown then frees by
        # reference count alone instead of re-scanning torch's and megatron's objects (1.6 s of
        # every rank's exit on 2 CPU cores). Files and logs are closed by then (atexit still runs).
        gc.freeze()
    sys.exit(code)

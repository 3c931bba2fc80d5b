"""Command lines of tools/convert_hf_to_mcore.py and tools/convert_mcore_to_hf.py."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Optional, Sequence

from megatron_patch.checkpoint_conversion.errors import ConversionError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)


# a disk that cannot take the output: said in one line (the writers' own errors are tracebacks,
# e.g. torch's "unexpected pos 704 vs 598" for a full disk)
_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only",
                errno.EACCES: "no permission to write there", errno.EDQUOT: "the disk quota is used up"}


def _run(action, out: str) -> int:
    try:
        action()
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        cause = _disk_error(exc)
        if cause is None:
            raise
        print(f"error: cannot write --out {out}: {cause} ({exc.__class__.__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}). Free space or choose another "
              "--out, then rerun with --overwrite", file=sys.stderr)
        return 1
    return 0


def _disk_error(error: BaseException) -> Optional[str]:
    """Why the output could not be written, when a disk problem is behind `error`."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_ERRORS:
            return _DISK_ERRORS[error.errno]
        if "No space left on device" in str(error) or "unexpected pos" in str(error):
            return _DISK_ERRORS[errno.ENOSPC]
        error = error.__cause__ or error.__context__
    return None


def hf_to_mcore_main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_patch.model.configs import PRESETS

    p = argparse.ArgumentParser(
        description="HF LLaVA-OneVision-1.5 checkpoint (safetensors) -> megatron base checkpoint "
                    "for train/pretrain_llava_ov.py --load OUT --tokenizer-path OUT")
    p.add_argument("--hf-dir", required=True,
                   help="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--out", required=True,
                   help="output directory (gets iter_0000000/ and the tokenizer files)")
    p.add_argument("--model", choices=sorted(PRESETS),
                   help="model preset; default: the one matching config.json")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size you will train with (validated; "
                   "the checkpoint loads at any TP)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size you will train with (validated)")
    p.add_argument("--dtype", default="auto", help="stored parameter dtype (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a converted model already in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _setup_logging()
    from megatron_patch.checkpoint_conversion.to_mcore import convert_hf_to_mcore

    return _run(lambda: convert_hf_to_mcore(args.hf_dir, args.out, model=args.model, tp=args.tp, pp=args.pp,
                                            dtype=args.dtype, overwrite=args.overwrite,
                                            progress=not args.no_progress), args.out)


def mcore_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_patch.model.configs import PRESETS

    p = argparse.ArgumentParser(
        description="megatron checkpoint (any TP/PP, base model or training run) -> HF safetensors")
    p.add_argument("--load", required=True,
                   help="run/save dir (newest complete checkpoint) or one iter_* dir")
    p.add_argument("--out", required=True, help="output HF checkpoint directory")
    p.add_argument("--model", choices=sorted(PRESETS),
                   help="model preset (default: from the checkpoint's records)")
    p.add_argument("--tokenizer-path",
                   help="tokenizer directory to copy (default: from the checkpoint's records)")
    p.add_argument("--dtype", default="auto", help="dtype of the written tensors (default: the source HF "
                   "checkpoint's, else the checkpoint's own)")
    p.add_argument("--key-layout", default="auto", choices=("auto", "flat", "nested"),
                   help="flat: visual.* / model.* (on-disk names of the released checkpoints); nested: "
                        "model.visual.* / model.language_model.*; auto: as the converted source had them")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a HF checkpoint already in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _setup_logging()
    from megatron_patch.checkpoint_conversion.to_hf import convert_mcore_to_hf

    return _run(lambda: convert_mcore_to_hf(args.load, args.out, model=args.model,
                                            tokenizer_path=args.tokenizer_path, dtype=args.dtype,
                                            key_layout=args.key_layout, max_shard_size=args.max_shard_size,
                                            overwrite=args.overwrite, progress=not args.no_progress),
                args.out)

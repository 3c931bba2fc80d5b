#!/usr/bin/env python
"""Convert LLaVA-style SFT data into WebDataset shards with an energon index (see --help)."""
import sys

if __name__ == "__main__":
    # imported here, as in every entry script: a child started with multiprocessing's "spawn"
    # method re-imports this file, and need not import the package
    from megatron_patch.data.convert_cli import main

    sys.exit(main())

#!/usr/bin/env python
"""Convert LLaVA-style SFT data into WebDataset shards with an energon index (see --help)."""
import os
import sys

if __name__ == "__main__":
    # imported here: a child started with multiprocessing's "spawn" method re-imports this file,
    # and need not import the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.data.convert_cli import main

    sys.exit(main())

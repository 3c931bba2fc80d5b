#!/usr/bin/env python
"""Convert LLaVA-style SFT data into WebDataset shards with an energon index (see --help)."""
import sys

from megatron_patch.data.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The README's test command: set up (if needed) and run the whole CPU test suite.
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh -k convert -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
exec .venv/bin/python -m pytest "$@"

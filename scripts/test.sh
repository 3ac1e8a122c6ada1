#!/usr/bin/env bash
# Set up (.venv, CPU torch, matformer[test]) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

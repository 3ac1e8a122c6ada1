#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, train a small MatFormer on the default corpus
# (the Python standard library's own source; offline), evaluate every tier and a few Mix'n'Match
# configurations, print the table, and write the checkpoint and the elastic-curve plot.
# OUT (default runs/demo) is where everything goes; extra args go to `matformer train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/demo}
RESUME=()
# A second run of the demo continues (or, if finished, just reports) the first: a finished run is
# never overwritten.
if [ -d "$OUT/checkpoints" ]; then RESUME=(--resume); fi
# 1000 steps (~3 minutes on 2 cores): long enough for the widths to order themselves.
.venv/bin/matformer train --out "$OUT" --steps 1000 --eval-every 250 --save-every 500 \
  --log-every 25 "${RESUME[@]}" "$@"
.venv/bin/matformer eval "$OUT" --plot "$OUT/elastic.png" --json-out "$OUT/eval.json"
echo
echo "checkpoint: $OUT/   plot: $OUT/elastic.png   eval report: $OUT/eval.json"

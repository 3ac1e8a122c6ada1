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
# The ffn8-tiny preset: FFN 8x hidden as in Gemma 3n, embeddings 13% of the parameters, so the
# nested widths differ in what they can do and the elastic curve slopes. 1000 steps of 16 x 128
# tokens, one width sampled per step with the paper's XL-weighted probabilities (Table 6: tiers
# 0..3 = XL..S drawn 0.41/0.22/0.20/0.17); uniform sampling left tier 0 level with tier 1 here.
.venv/bin/matformer train --out "$OUT" --preset ffn8-tiny --vocab-size 1024 --steps 1000 \
  --tier-probs 0.41,0.22,0.20,0.17 --eval-every 250 --save-every 500 --log-every 25 \
  "${RESUME[@]}" "$@"
.venv/bin/matformer eval "$OUT" --plot "$OUT/elastic.png" --json-out "$OUT/eval.json"
echo
echo "checkpoint: $OUT/   plot: $OUT/elastic.png   eval report: $OUT/eval.json"

"""Does nesting attention heads as well cost anything? (issue 11, docs/RESULTS.md)

Two arms, same model, data, steps, batch and seeds, the `sample` objective:
- ffn:   `matformer train` with the FFN tiers 0..3 only (the heads are not nested);
- heads: the same plus `--nest-heads` (each step draws a (tier, KV heads) pair from the grid
         tiers 0..3 x heads G, G/2, ..., 1).
Every run is then evaluated by `matformer.evaluate` on its held-out windows (the same windows
for both arms: same corpus, split and seq_len) at every tier x every head count, so the answer
reads off one table: the full model and the FFN-only widths at all heads (does the heads arm
lose anything there?), and the head-reduced points (what do they reach; and what the ffn arm,
never trained at fewer heads, gives there).

    .venv/bin/python -m benchmarks.speed.heads_train --seeds 0 1 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import parser, write_json
from matformer.evaluation.lm import evaluate
from matformer.tiers import head_granularities
from matformer.training import TrainConfig, train


def _run(arm: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.workdir) / f"{arm}-seed{seed}"
    cfg = TrainConfig(out=str(out), preset=args.preset, steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, seed=seed,
                      eval_every=args.steps, save_every=args.steps, num_heads=args.num_heads,
                      num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                      nest_heads=arm == "heads", quiet=True, eval_windows=args.eval_windows)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    report = evaluate(out, mix_n_match=False, decode=False, speculative=False,
                      kv_heads=head_granularities(args.num_kv_heads))
    points = {f"t{r.tier}/kv{r.kv_heads[0]}": {"loss": r.loss, "params": r.non_embedding_params,
                                               "kl": r.kl_from_reference}
              for r in report.results}
    return {"arm": arm, "seed": seed, "train_seconds": seconds, "points": points}


def main() -> None:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--num-kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--workdir", default="runs/heads-exp")
    ap.add_argument("--out", default="benchmarks/results/heads_train.json")
    args = ap.parse_args()
    runs = [_run(arm, s, args) for s in args.seeds for arm in ("ffn", "heads")]
    keys = list(runs[0]["points"])
    table = []
    for k in keys:
        row = {"point": k, "params": runs[0]["points"][k]["params"]}
        for arm in ("ffn", "heads"):
            losses = [r["points"][k]["loss"] for r in runs if r["arm"] == arm]
            row[arm] = statistics.mean(losses)
            row[f"{arm}_seeds"] = losses
        row["delta"] = row["heads"] - row["ffn"]
        table.append(row)
    print(f"{'point':<10} {'non-emb':>9} {'ffn arm':>9} {'heads arm':>10} {'heads-ffn':>10}  "
          f"(mean over seeds {args.seeds}; per seed in the JSON)")
    for row in sorted(table, key=lambda r: -r["params"]):
        print(f"{row['point']:<10} {row['params']:>9,} {row['ffn']:9.4f} {row['heads']:10.4f} "
              f"{row['delta']:+10.4f}")
    path = Path(args.out)
    write_json(path, {"args": vars(args), "runs": runs, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Runtime slicing cost: forward+backward time at tiers 0..3 of ONE full-width model running at
tier t (views of the full weights) vs a model BUILT at width B>>t holding the same sliced weights.

Both are timed in the same run, interleaved, and reported as a ratio (sliced / built) of the
best of the repeats (the least disturbed run, as timeit recommends on a shared machine; medians are
in the JSON too); the goal is <= 1.10 at every tier.

    .venv/bin/python -m benchmarks.speed.widths            # default shape, writes benchmarks/results/widths.json
    .venv/bin/python -m benchmarks.speed.widths --quick    # a smaller shape for a smoke run
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import parser, write_json
from matformer import MatFormerConfig, MatFormerLM
from matformer.models.lm.shapes import parameter_counts


def _sliced_state(sd: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if ".mlp." in k:
            v = v[:, :m] if "down_proj" in k else v[:m]
        out[k] = v.clone()
    return out


def _step(model: MatFormerLM, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.loss(x).backward()


def main() -> None:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/widths.json")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.layers, args.seq, args.repeats = 256, 2048, 2, 128, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MatFormerConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(1, args.hidden // 128),
                          max_position_embeddings=max(args.seq, 256))
    full = MatFormerLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    rows = []
    for tier in range(4):
        m = cfg.base >> tier
        built = MatFormerLM(cfg.with_widths(m))
        built.load_state_dict(_sliced_state(full.state_dict(), m))
        full.set_widths(tier=tier)
        for model in (full, built):  # warm-up
            _step(model, x)
        t_sliced, t_built = [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            t0 = time.perf_counter()
            _step(full, x)
            t_sliced.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _step(built, x)
            t_built.append(time.perf_counter() - t0)
        s, b = min(t_sliced), min(t_built)
        rows.append({
            "tier": tier, "width": m,
            "non_embedding_params": parameter_counts(cfg, [m] * cfg.num_hidden_layers)["non_embedding"],
            "sliced_s": s, "built_s": b, "ratio": s / b,
            "sliced_median_s": statistics.median(t_sliced), "built_median_s": statistics.median(t_built),
        })
        del built
    full.set_widths()
    t0_time = rows[0]["sliced_s"]
    print(f"forward+backward, batch {args.batch} x seq {args.seq}, hidden {args.hidden}, "
          f"ffn {args.ffn}, {args.layers} layers, {torch.get_num_threads()} threads")
    print(f"{'tier':>4} {'width':>6} {'sliced ms':>10} {'built ms':>9} {'ratio':>6} {'vs tier 0':>9}")
    for r in rows:
        print(f"{r['tier']:>4} {r['width']:>6} {r['sliced_s'] * 1e3:>10.1f} {r['built_s'] * 1e3:>9.1f} "
              f"{r['ratio']:>6.3f} {r['sliced_s'] / t0_time:>9.3f}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio sliced/built: {worst:.3f} (goal <= 1.10: {'met' if worst <= 1.10 else 'NOT met'})")
    out = Path(args.out)
    write_json(out, {
        "benchmark": "widths", "args": vars(args), "torch": torch.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(), "rows": rows,
        "worst_ratio": worst,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

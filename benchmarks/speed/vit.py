"""MatViT speed: training images/s against transformers' ViT, and runtime widths against built ones.

Part 1: one training step (forward + backward + AdamW step) of MatViT at full width against
transformers' `ViTForImageClassification` of the same shape, dtype and weights (sdpa attention),
same threads and batches, interleaved in one process. Goal: >= 1.0x images/s.

Part 2: ONE full model running at a runtime setting (FFN tier t and/or g heads: views of the full
weights) against a MatViT BUILT at that size holding the same sliced weights; forward+backward
and forward-only (inference; twice the repeats, it is cheap) time. Goal: <= 1.10x everywhere.

Each ratio is the median over repeats of (ours / reference) measured back to back, in alternating
order, so drift on a shared machine hits both sides of a ratio alike; the medians of the raw
times are in the JSON. MatViT's last block computes only the [CLS] row (see vit.py), which is
where its margin over transformers comes from; both sides of part 2 are MatViTs.

    .venv/bin/python -m benchmarks.speed.vit --threads 1   # ~1 minute -> benchmarks/results/vit.json
    .venv/bin/python -m benchmarks.speed.vit --quick --out /tmp/vit.json   # smoke run
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS, parser, write_json
from matformer.models.vit.config import MatViTConfig, parameter_counts
from matformer.models.vit.model import MatViT


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _paired(a: Callable[[], object], b: Callable[[], object], repeats: int) -> dict[str, float]:
    """Warm both, then time them back to back `repeats` times, alternating which goes first
    (so a slowdown that builds up within a pair does not always land on the same side)."""
    for _ in range(2):
        a()
        b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:
            tb.append(_timed(b))
            ta.append(_timed(a))
        else:
            ta.append(_timed(a))
            tb.append(_timed(b))
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb),
            "ratio": statistics.median(x / y for x, y in zip(ta, tb, strict=True)),
            "ratio_best": min(ta) / min(tb)}


def bench_vs_transformers(cfg: MatViTConfig, batch: int, repeats: int) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ours = MatViT(cfg).train()
    hf_cfg = ViTConfig.from_dict(cfg.to_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf = ViTForImageClassification(hf_cfg).train()
    # Same weights through transformers' own loader conversion (our names are its file names).
    hf.load_state_dict(_as_transformers_names(ours.state_dict()))
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_labels or 1, (batch,))
    kw = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    opt_ours = torch.optim.AdamW(ours.parameters(), **kw)
    opt_hf = torch.optim.AdamW(hf.parameters(), **kw)

    def step_ours() -> None:
        ours.loss(x, y).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf() -> None:
        hf(pixel_values=x, labels=y).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    r = _paired(step_ours, step_hf, repeats)
    return {"ours_step_s": r["a_s"], "transformers_step_s": r["b_s"],
            "ours_images_per_s": batch / r["a_s"], "transformers_images_per_s": batch / r["b_s"],
            "speedup": 1 / r["ratio"], "speedup_best": 1 / r["ratio_best"]}


def _as_transformers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps the file names (ours) on disk but renames its modules in memory."""
    rename = [("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
              ("attention.attention.key", "attention.k_proj"),
              ("attention.attention.value", "attention.v_proj"),
              ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
              ("output.dense", "mlp.fc2")]
    out = {}
    for k, v in state.items():
        for a, b in rename:
            k = k.replace(a, b)
        out[k] = v
    return out


def _sliced(state: dict[str, torch.Tensor], hd: int, m: int, g: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if ".encoder.layer." in k:
            if "intermediate.dense" in k:
                v = v[:m]
            elif k.endswith(".output.dense.weight") and "attention" not in k:
                v = v[:, :m]
            elif ".attention.attention." in k:
                v = v[:g * hd]
            elif k.endswith("attention.output.dense.weight"):
                v = v[:, :g * hd]
        out[k] = v.clone()
    return out


def _train_step(model: MatViT, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()


def _infer(model: MatViT, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def bench_runtime_settings(cfg: MatViTConfig, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    full = MatViT(cfg)
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_labels or 1, (batch,))
    settings = [(t, None) for t in range(4)] + [(0, max(1, cfg.base_kv_heads // 2)), (2, max(1, cfg.base_kv_heads // 2))]
    rows = []
    for tier, heads in settings:
        m, g = cfg.base >> tier, heads or cfg.base_kv_heads
        built = MatViT(cfg.with_widths(m, g))
        built.load_state_dict(_sliced(full.state_dict(), cfg.head_dim or 0, m, g))
        full.set_widths(tier=tier, kv_heads=heads)

        tr = _paired(lambda: _train_step(full, x, y), lambda b=built: _train_step(b, x, y), repeats)
        inf = _paired(lambda: _infer(full, x), lambda b=built: _infer(b, x), 2 * repeats + 1)
        rows.append({"tier": tier, "width": m, "heads": g,
                     "non_embedding_params": parameter_counts(cfg, [m] * cfg.num_hidden_layers,
                                                              [g] * cfg.num_hidden_layers)["non_embedding"],
                     "train_runtime_s": tr["a_s"], "train_built_s": tr["b_s"], "train_ratio": tr["ratio"],
                     "infer_runtime_s": inf["a_s"], "infer_built_s": inf["b_s"], "infer_ratio": inf["ratio"]})
    full.set_widths()
    return rows


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="the debug preset's shape, 3 repeats")
    ap.add_argument("--out", default=str(RESULTS / "vit.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cfg = MatViTConfig.from_preset("debug")
        args.repeats, args.batch = 3, 16
    else:
        cfg = MatViTConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                           hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=args.ffn, num_labels=10)
    print(f"MatViT {cfg.image_size}px/{cfg.patch_size} ({cfg.num_patches + 1} tokens), hidden "
          f"{cfg.hidden_size}, FFN {cfg.base}, {cfg.num_hidden_layers} layers, {cfg.base_kv_heads} heads; "
          f"batch {args.batch}, float32, {torch.get_num_threads()} threads, median of {args.repeats}")
    a = bench_vs_transformers(cfg, args.batch, args.repeats)
    print("\n| training step (fwd+bwd+AdamW) | ms | images/s |")
    print("|---|---:|---:|")
    print(f"| MatViT | {a['ours_step_s'] * 1e3:.1f} | {a['ours_images_per_s']:,.0f} |")
    print(f"| transformers ViT | {a['transformers_step_s'] * 1e3:.1f} | {a['transformers_images_per_s']:,.0f} |")
    print(f"MatViT / transformers images/s: {a['speedup']:.3f}x (goal >= 1.0: "
          f"{'met' if a['speedup'] >= 1.0 else 'NOT met'})")
    rows = bench_runtime_settings(cfg, args.batch, args.repeats)
    print("\n| tier | width | heads | non-emb params | fwd+bwd runtime/built | forward runtime/built |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tier']} | {r['width']} | {r['heads']} | {r['non_embedding_params']:,} | "
              f"{r['train_ratio']:.3f} ({r['train_runtime_s'] * 1e3:.1f} / {r['train_built_s'] * 1e3:.1f} ms) | "
              f"{r['infer_ratio']:.3f} ({r['infer_runtime_s'] * 1e3:.1f} / {r['infer_built_s'] * 1e3:.1f} ms) |")
    worst = max(max(r["train_ratio"], r["infer_ratio"]) for r in rows)
    print(f"worst runtime/built ratio: {worst:.3f} (goal <= 1.10: {'met' if worst <= 1.10 else 'NOT met'})")
    out = Path(args.out)
    write_json(out, {
        "benchmark": "vit", "config": cfg.to_dict(), "batch": args.batch, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0], "vs_transformers": a,
        "runtime_vs_built": rows, "worst_runtime_ratio": worst,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""MatViT on the digits: one nested model against separately trained ViTs of each width.

For every seed: one MatViT (`--objective joint`: all four FFN tiers on every batch) and four
independent baselines, plain ViTs built at widths B, B/2, B/4, B/8 (`--intermediate-size`,
`--objective single`), all with the same preset, steps, batch, lr and data order, through
`matformer train --arch vit`. Then on the held-out images (the same split for every run):
- top-1 of every width (MatViT at each tier and the least-slope Mix'n'Match points; each
  baseline), mean and spread (min..max) over the seeds;
- elastic retrieval: leave-one-out 1-NN (cosine) accuracy of queries embedded by each width
  against a gallery embedded by the full width — MatViT's tier t against MatViT's tier 0, and
  baseline t against baseline 0 (the issue's "query by baseline S, gallery by baseline XL");
  each baseline against its own gallery is shown too, as the retrieval quality that width has
  by itself.
Budget: every run takes the same number of optimizer steps on the same batches; MatViT's joint
step runs four widths, so it costs about what the four baselines cost together.

    .venv/bin/python -m benchmarks.paper.vit_reproduce --steps 2000 --seeds 0,1,2   # 8 min on one H100
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.paper.vit_reproduce --jobs 2  # 600 steps, 2 seeds, CPU
    .venv/bin/python -m benchmarks.paper.vit_reproduce --quick --out /tmp/vit_repro.json  # smoke run
Training runs on CUDA when there is one (`--device auto`); evaluation on the CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, parser, write_json
from matformer import load_model
from matformer.evaluation.vision import checkpoint_heldout, cross_retrieval, evaluate_vit
from matformer.io.source import resolve_source
from matformer.models.vit.config import MatViTConfig
from matformer.training import TrainConfig, train

TIERS = (0, 1, 2, 3)
NAMES = {0: "XL", 1: "L", 2: "M", 3: "S"}


def _run(job: dict[str, Any]) -> str:
    """One training run (in a worker process, one thread)."""
    torch.set_num_threads(1)
    out = Path(job.pop("out"))
    if not (out / "train_summary.json").is_file():
        train(TrainConfig(out=str(out), arch="vit", quiet=True, **job))
    return str(out)


def _jobs(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    base = MatViTConfig.from_preset(args.preset).base
    common = dict(preset=args.preset, steps=args.steps, batch_size=args.batch, lr=args.lr,
                  eval_every=args.steps, save_every=args.steps, keep_checkpoints=1)
    jobs = []
    for seed in args.seeds:
        jobs.append(dict(out=str(root / f"matvit-s{seed}"), objective="joint", seed=seed, **common))
        for t in TIERS:
            jobs.append(dict(out=str(root / f"base-t{t}-s{seed}"), objective="single", seed=seed,
                             intermediate_size=base >> t, **common))
    return jobs


def _evaluate(root: Path, seeds: list[int]) -> dict[str, Any]:
    per_seed = []
    for seed in seeds:
        src = resolve_source(root / f"matvit-s{seed}")
        matvit = load_model(src)
        heldout = checkpoint_heldout(src, matvit)
        report = evaluate_vit(matvit, heldout, repeats=1)
        baselines = {t: load_model(root / f"base-t{t}-s{seed}") for t in TIERS}
        base_rows = {}
        for t, model in baselines.items():
            r = evaluate_vit(model, heldout, uniform_tiers=[0], mix_n_match=False, repeats=1).results[0]
            base_rows[t] = {"width": r.widths[0], "non_embedding_params": r.non_embedding_params,
                            "top1": r.top1, "retrieval_own_gallery": r.retrieval,
                            "retrieval_vs_xl_gallery": cross_retrieval(model, baselines[0], heldout)}
        per_seed.append({"seed": seed, "matvit": report.to_dict(), "baselines": base_rows})
    return {"per_seed": per_seed, "summary": _summary(per_seed)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for s in per_seed:
        for r in s["matvit"]["results"]:
            row = rows.setdefault(r["name"], {"kind": r["kind"], "widths": r["widths"],
                                              "params": r["non_embedding_params"], "top1": [],
                                              "retrieval": [], "agreement": []})
            for k in ("top1", "retrieval", "agreement"):
                row[k].append(r[k])
    matvit = {name: {**{k: v for k, v in row.items() if k not in ("top1", "retrieval", "agreement")},
                     **{k: _spread(row[k]) for k in ("top1", "retrieval", "agreement")}}
              for name, row in rows.items()}
    base = {}
    for t in TIERS:
        rs = [s["baselines"][t] for s in per_seed]
        base[t] = {"width": rs[0]["width"], "params": rs[0]["non_embedding_params"],
                   **{k: _spread([r[k] for r in rs]) for k in
                      ("top1", "retrieval_own_gallery", "retrieval_vs_xl_gallery")}}
    return {"matvit": matvit, "baselines": base}


def _fmt(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"


def print_tables(summary: dict[str, Any], seeds: list[int]) -> None:
    mv, base = summary["matvit"], summary["baselines"]
    print(f"\ntop-1 % on held-out digits, mean (min–max) over seeds {seeds}")
    print("| width | non-emb params | MatViT (one model) | baseline (own model) | MatViT agreement with XL |")
    print("|---|---:|---:|---:|---:|")
    for t in TIERS:
        r = mv[f"tier {t}"] if f"tier {t}" in mv else next(v for k, v in mv.items() if k.startswith(f"tier {t} "))
        print(f"| {NAMES[t]} (tier {t}, FFN {base[t]['width']}) | {base[t]['params']:,} | "
              f"{_fmt(r['top1'])} | {_fmt(base[t]['top1'])} | {_fmt(r['agreement'])} |")
    print("\nMix'n'Match (least slope), MatViT only")
    print("| widths per layer | non-emb params | top-1 % | agreement % |")
    print("|---|---:|---:|---:|")
    for name, r in sorted(((n, r) for n, r in mv.items() if r["kind"] == "mix"), key=lambda x: x[1]["params"]):
        print(f"| {name} | {r['params']:,} | {_fmt(r['top1'])} | {_fmt(r['agreement'])} |")
    print("\nelastic retrieval: leave-one-out 1-NN (cosine) %, queries by each width, gallery by XL")
    print("| query width | MatViT tier t vs MatViT XL | baseline t vs baseline XL | baseline t vs its own gallery |")
    print("|---|---:|---:|---:|")
    for t in TIERS:
        r = mv[f"tier {t}"] if f"tier {t}" in mv else next(v for k, v in mv.items() if k.startswith(f"tier {t} "))
        print(f"| {NAMES[t]} (tier {t}) | {_fmt(r['retrieval'])} | "
              f"{_fmt(base[t]['retrieval_vs_xl_gallery'])} | {_fmt(base[t]['retrieval_own_gallery'])} |")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once (1 thread each)")
    ap.add_argument("--runs", default="runs/vit_reproduce", help="where the checkpoints go")
    ap.add_argument("--out", default=str(RESULTS / "vit_reproduce.json"))
    ap.add_argument("--quick", action="store_true", help="debug preset, 20 steps, one seed")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.steps, args.seeds = "debug", 20, "0"
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    root = Path(args.runs)
    t0 = time.time()
    jobs = _jobs(args, root)
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(_run, jobs)
    else:
        for job in jobs:
            _run(job)
    train_s = time.time() - t0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = _evaluate(root, args.seeds)
    print_tables(results["summary"], args.seeds)
    elapsed = time.time() - t0
    print(f"\n{len(jobs)} training runs in {train_s / 60:.1f} min, all in {elapsed / 60:.1f} min")
    out = Path(args.out)
    write_json(out, {
        "benchmark": "vit_reproduce", "args": {k: v for k, v in vars(args).items()},
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(), "train_minutes": train_s / 60, "minutes": elapsed / 60, **results,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""MatFormer-izing a pretrained dense model (issue 17), measured end to end at small scale.

    .venv/bin/python -m benchmarks.speed.convert            # the documented run (2 seeds)
    .venv/bin/python -m benchmarks.speed.convert --quick    # the same pipeline on a tiny budget (minutes)

Per seed (default 0 and 1), tiny preset (hidden 128, FFN 512, 4 layers), on the default corpus (Python stdlib sources), one tokenizer:
1. the "pretrained" dense source: `matformer train --objective single` (tier 0), P steps;
2. `matformer convert` of it with each importance order (reconstruction: the default;
   contribution; activation: Minitron's), on the default calibration windows (training split);
3. nested distillation: `matformer train --init-from <converted> --distill <source> --objective
   sample` for D steps (D/P of the pretraining tokens), alpha and T as the library's defaults;
4. from scratch, one model per size: `--objective single --tier t`, P + D steps (the same total
   tokens as source + distillation).
Every model is scored on the same held-out windows (`matformer.evaluation.compare.compare`, which is
`matformer eval A --compare B,...`): per tier, naive truncation (the dense source at tier t keeps
its first neurons in their trained order), importance-ordered truncation (the converted model at
tier t), after distillation, and the scratch model of that size. Heads: the source and the
converted model with 1 of 2 KV heads per layer (tier 0 FFN), naive vs ordered.

Prints the table (mean and min..max over seeds) and writes benchmarks/results/convert.json
(--quick: convert-quick.json). Models go under --out (default runs/convert, git-ignored).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, hardware, parser, write_json

TIERS = (0, 1, 2, 3)
METHODS = ("reconstruction", "contribution", "activation")


@dataclass
class Settings:
    preset: str = "tiny"
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    distill_lr: float = 1e-3
    """Peak lr of the distillation run (a fine-tune of a trained model: a third of the
    pretraining peak)."""
    pretrain_steps: int = 400
    distill_steps: int = 40
    eval_windows: int = 64
    calibration_samples: int = 128
    seeds: tuple[int, ...] = (0, 1)
    jobs: int = 2

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


QUICK = dict(pretrain_steps=16, distill_steps=4, seq_len=64, batch_size=8, eval_windows=8,
             calibration_samples=16)


def _train(kw: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (one torch thread)."""
    from matformer.training import TrainConfig, train

    torch.set_num_threads(1)
    t0 = time.time()
    res = train(TrainConfig(**kw))
    return {"out": str(res.out), "seconds": time.time() - t0, "train_tokens": res.train_tokens,
            "final_val_loss": {str(k): v for k, v in res.final_val_loss.items()}}


def _convert_and_distill(s: Settings, seed: int, root: Path, common: dict[str, Any]) -> dict[str, Any]:
    """Convert the seed's source with both importance scores, then distill the default one."""
    from matformer.slicing.convert import convert

    torch.set_num_threads(1)
    src, out = root / f"s{seed}-dense", {}
    for method in METHODS:
        t0 = time.time()
        r = convert(src, root / f"s{seed}-mat-{method}", method=method,
                    samples=s.calibration_samples, cache_dir=common["cache_dir"])
        out[f"convert_{method}"] = {"seconds": time.time() - t0,
                                    "max_abs_logit_diff": r.max_abs_logit_diff}
    out["distill"] = _train({**common, "out": str(root / f"s{seed}-distilled"), "seed": seed,
                             "init_from": str(root / f"s{seed}-mat-reconstruction"),
                             "distill": str(src), "objective": "sample", "lr": s.distill_lr,
                             "steps": s.distill_steps})
    return out


def run_all(s: Settings, root: Path) -> dict[str, Any]:
    common = dict(data=None, preset=s.preset, vocab_size=s.vocab_size, seq_len=s.seq_len,
                  batch_size=s.batch_size, lr=s.lr, warmup_steps=max(1, s.pretrain_steps // 20),
                  eval_windows=s.eval_windows, cache_dir=str(root / "cache"), quiet=True,
                  log_every=10**9)
    total = s.pretrain_steps + s.distill_steps
    runs: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=s.jobs, mp_context=ctx) as ex:
        futures = {}
        for seed in s.seeds:
            futures[f"s{seed}-dense"] = ex.submit(_train, {
                **common, "out": str(root / f"s{seed}-dense"), "seed": seed, "objective": "single",
                "steps": s.pretrain_steps, "eval_every": s.pretrain_steps,
                "save_every": s.pretrain_steps})
        for seed in s.seeds:
            for t in TIERS:
                futures[f"s{seed}-scratch-t{t}"] = ex.submit(_train, {
                    **common, "out": str(root / f"s{seed}-scratch-t{t}"), "seed": seed,
                    "objective": "single", "tier": t, "steps": total, "eval_every": total,
                    "save_every": total})
        for seed in s.seeds:
            runs[f"s{seed}-dense"] = futures.pop(f"s{seed}-dense").result()
            print(f"  source seed {seed}: {runs[f's{seed}-dense']['seconds']:.0f}s", flush=True)
            futures[f"s{seed}-convert"] = ex.submit(
                _convert_and_distill, s, seed, root,
                {**common, "eval_every": s.distill_steps, "save_every": s.distill_steps,
                 "warmup_steps": max(1, s.distill_steps // 10)})
        for name, f in futures.items():
            runs[name] = f.result()
            print(f"  {name} done", flush=True)
    return runs


def evaluate_all(s: Settings, root: Path) -> dict[str, Any]:
    """Per seed: every checkpoint on the source's held-out windows."""
    from matformer.evaluation.compare import compare
    from matformer.io.checkpoint import load_model

    torch.set_num_threads(2)
    per_seed = {}
    for seed in s.seeds:
        names = ["dense", *[f"mat-{m}" for m in METHODS], "distilled",
                 *[f"scratch-t{t}" for t in TIERS]]
        c = compare([root / f"s{seed}-{n}" for n in names], tiers=TIERS,
                    max_tokens=s.eval_windows * s.seq_len)
        losses = {n: dict(zip(TIERS, c.losses[i], strict=True)) for i, n in enumerate(names)}
        heads = {}
        windows = _heldout(root / f"s{seed}-dense", s)
        for n in ("dense", *[f"mat-{m}" for m in METHODS]):
            m = load_model(root / f"s{seed}-{n}").eval()
            with torch.no_grad(), m.at_width(kv_heads=1):
                heads[n] = float(np.mean([float(m.loss(w[None])) for w in windows]))
        per_seed[seed] = {"losses": losses, "kv_heads_1": heads, "widths": c.widths,
                          "non_embedding_params": c.non_embedding_params, "data": c.data}
    return per_seed


def _heldout(src: Path, s: Settings) -> torch.Tensor:
    from matformer.data import text as D

    return torch.from_numpy(D.heldout_windows(D.heldout_tokens(src), s.seq_len, s.eval_windows))


def _stat(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "min": float(min(xs)), "max": float(max(xs))}


def summarize(s: Settings, per_seed: dict[int, Any]) -> dict[str, Any]:
    rows = []
    first = per_seed[s.seeds[0]]
    for k, t in enumerate(TIERS):
        row: dict[str, Any] = {"tier": t, "ffn": first["widths"][k],
                               "non_embedding_params": first["non_embedding_params"][k]}
        for col, name in (("naive", "dense"), *[(m, f"mat-{m}") for m in METHODS],
                          ("distilled", "distilled"), ("scratch", f"scratch-t{t}")):
            row[col] = _stat([per_seed[sd]["losses"][name][t] for sd in s.seeds])
        rows.append(row)
    heads = {n: _stat([per_seed[sd]["kv_heads_1"][n] for sd in s.seeds])
             for n in ("dense", *[f"mat-{m}" for m in METHODS])}
    return {"rows": rows, "kv_heads_1": heads}


def table(summary: dict[str, Any]) -> str:
    def cell(x: dict[str, float]) -> str:
        return f"{x['mean']:.3f} ({x['min']:.3f}-{x['max']:.3f})"

    cols = ("naive", *METHODS, "distilled", "scratch")
    head = ["tier", "FFN", "non-emb params", "naive trunc.", *[f"ordered ({m})" for m in METHODS],
            "distilled", "from scratch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        lines.append(f"| {r['tier']} | {r['ffn']} | {r['non_embedding_params']:,} | "
                     + " | ".join(cell(r[c]) for c in cols) + " |")
    h = summary["kv_heads_1"]
    lines.append("\n1 of 2 KV heads per layer (full FFN): naive " + cell(h["dense"]) + "; "
                 + "; ".join(f"{m} {cell(h[f'mat-{m}'])}" for m in METHODS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, full_doc=True)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the pipeline")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once")
    p.add_argument("--out", default="runs/convert", help="where the models go")
    p.add_argument("--results", default=None, help="JSON file (default benchmarks/results/convert.json)")
    args = p.parse_args(argv)
    s = Settings(**(QUICK if args.quick else {}), jobs=args.jobs)
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(int(x) for x in args.seeds.split(",")))
    root = Path(args.out) / ("quick" if args.quick else "full")
    if root.exists() and any(root.iterdir()):
        print(f"{root}: not empty; remove it or pass another --out", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"settings: {dataclasses.asdict(s)}; distillation = {s.distill_steps / s.pretrain_steps:.0%}"
          f" of the pretraining tokens", flush=True)
    runs = run_all(s, root)
    t1 = time.time()
    per_seed = evaluate_all(s, root)
    summary = summarize(s, per_seed)
    print(table(summary))
    doc = {"settings": {**dataclasses.asdict(s), "tokens_per_step": s.tokens_per_step},
           "summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()}, "runs": runs,
           "seconds": {"training": t1 - t0, "evaluation": time.time() - t1},
           "machine": hardware()}
    out = Path(args.results) if args.results else RESULTS / ("convert-quick.json" if args.quick else "convert.json")
    write_json(out, doc)
    print(f"wrote {out} ({time.time() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce the MatFormer paper's claims at small scale: nested widths vs independently trained
models, Mix'n'Match shapes, consistency with the full width.

    .venv/bin/python -m benchmarks.paper.reproduce_v1          # the documented experiment (< 1 h, 2 cores)
    .venv/bin/python -m benchmarks.paper.reproduce_v1 --quick  # the same pipeline, tiny budget (minutes)

v2 (issue 15) is its own script: `python -m benchmarks.paper.reproduce_v2`.

This is v1 (docs/RESULTS.md, "v1"): the `tiny` preset, where the FFN widths barely differ. v2
redoes it on an FFN-heavy preset with three seeds, two corpora and both budgets labelled.

Per seed (default seeds 0 and 1), on the default corpus (Python stdlib sources), one tokenizer:
- baselines: four models, each trained alone at one width (objective `single`, runtime tier t:
  only the first B>>t FFN neurons exist for it; parameters are counted at that width), X tokens;
- MatLM (uniform): one model, objective `sample` with uniform probabilities, 4X tokens;
- MatLM (XL up-weighted): `sample` with S/M/L/XL = 0.17/0.20/0.22/0.41 (paper Table 6), 4X tokens;
- joint at equal compute: every step runs all four widths on one batch (loss = mean of the four),
  so it takes as many steps as ONE baseline: X tokens seen, and the same number of
  forward+backward token-passes at each width as the four baselines together (and as sampled
  MatLM in expectation) — equal FLOPs, a quarter of the data.
Every model is evaluated on the same held-out windows: loss per width, non-embedding parameters,
consistency with the XL model (greedy-token match and KL(P_XL || P_width)): the MatLM's own XL for
its submodels, the XL baseline for the baselines. Mix'n'Match: per-layer mixes of two neighbouring
trained widths in several shapes (non-decreasing with depth, decreasing, alternating) at equal
parameter counts.

Spread: each number is the mean over seeds with its min..max. A difference between two means is a
"tie" when it is not larger than the larger of the two min..max ranges.

Writes docs/results/reproduce.json (quick: reproduce-quick.json) and PNG plots beside it; the
trained models stay under --out (runs/reproduce by default, git-ignored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import hardware, parser
from benchmarks.paper.common import (
    TIER_NAMES,
    TIERS,
    XL_UPWEIGHTED_PROBS,
    XL_UPWEIGHTED_SML_XL,
    compare,
    compare_paired,
    mix_shapes,
    pool_map,
    prepare_out,
    shape_of,
    spread,
    tier_passes,
)

CONFIGS = ("baseline", "matlm_uniform", "matlm_xl", "joint")
CONFIG_LABELS = {
    "baseline": "baselines (4 models, X tokens each)",
    "matlm_uniform": "MatLM, sample uniform (4X tokens)",
    "matlm_xl": "MatLM, sample 0.17/0.20/0.22/0.41 (4X tokens)",
    "joint": "MatLM, joint at equal compute (X tokens, 4 widths/step)",
}


@dataclass
class Settings:
    preset: str = "tiny"
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    baseline_steps: int = 128
    """Steps of one baseline: X = baseline_steps * batch_size * seq_len tokens."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    eval_windows: int = 64
    """Held-out windows of seq_len tokens, the same for every model."""
    jobs: int = 2
    """Training/evaluation processes in parallel, one torch thread each."""
    lr: float = 3e-3
    max_corpus_bytes: int | None = None
    cache_dir: str | None = None
    out: str = "runs/reproduce"
    quick: bool = False

    @property
    def x_tokens(self) -> int:
        return self.baseline_steps * self.batch_size * self.seq_len


QUICK = dict(baseline_steps=12, batch_size=8, seq_len=64, eval_windows=16)


# ---- the runs --------------------------------------------------------------------------------


def run_specs(s: Settings) -> list[dict[str, Any]]:
    """One dict per training run: name, config, seed, tier (baselines) and TrainConfig kwargs."""
    specs = []
    # Every optimizer setting is pinned here, so a change of the library's defaults can't change
    # this experiment (these are the values the documented run used).
    common = dict(preset=s.preset, vocab_size=s.vocab_size, seq_len=s.seq_len,
                  batch_size=s.batch_size, lr=s.lr, min_lr_ratio=0.1, warmup_steps=20,
                  weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0,
                  max_corpus_bytes=s.max_corpus_bytes,
                  cache_dir=s.cache_dir, trained_tiers=list(TIERS), quiet=True,
                  eval_windows=min(8, s.eval_windows))
    for seed in s.seeds:
        for t in TIERS:
            specs.append(dict(name=f"baseline-t{t}-seed{seed}", config="baseline", seed=seed, tier=t,
                              train=dict(common, objective="single", tier=t, steps=s.baseline_steps,
                                         seed=seed)))
        specs.append(dict(name=f"matlm_uniform-seed{seed}", config="matlm_uniform", seed=seed,
                          tier=None, train=dict(common, objective="sample", steps=4 * s.baseline_steps,
                                                seed=seed)))
        specs.append(dict(name=f"matlm_xl-seed{seed}", config="matlm_xl", seed=seed, tier=None,
                          train=dict(common, objective="sample", steps=4 * s.baseline_steps, seed=seed,
                                     tier_probs=list(XL_UPWEIGHTED_PROBS))))
        specs.append(dict(name=f"joint-seed{seed}", config="joint", seed=seed, tier=None,
                          train=dict(common, objective="joint", steps=s.baseline_steps, seed=seed,
                                     joint_weights=[1.0 / len(TIERS)] * len(TIERS))))
    for sp in specs:
        steps = sp["train"]["steps"]
        sp["train"].update(eval_every=steps, save_every=steps, keep_checkpoints=1,
                           log_every=max(1, steps // 4))
    return specs


def _train_one(spec: dict[str, Any], out_root: str) -> dict[str, Any]:
    """Worker: one training run, one torch thread (two runs share two cores better than one run
    with two threads, which oversubscribes a busy machine)."""
    torch.set_num_threads(1)
    from matformer.training import TrainConfig, train

    out = Path(out_root) / spec["name"]
    t0 = time.time()
    res = train(TrainConfig(out=str(out), **spec["train"]))
    tok_sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    return dict(name=spec["name"], out=str(out), final_val_loss={str(k): v for k, v in res.final_val_loss.items()},
                train_tokens=res.train_tokens, tokens_per_second=res.tokens_per_second,
                train_seconds=res.elapsed_s, wall_seconds=time.time() - t0, tokenizer_sha256=tok_sha)


# ---- consistency between two different models -------------------------------------------------


@torch.no_grad()
def consistency(reference: torch.nn.Module, model: torch.nn.Module, windows: np.ndarray,
                batch_size: int = 16) -> dict[str, float]:
    """Greedy-token agreement and KL(P_ref || P_model) (nats per position) of two models, each at
    its current width, on the same windows (n, T): every position of every window, the same
    definitions as `matformer.evaluation.lm` uses within one model."""
    match = 0
    kl = 0.0
    n = 0
    for b in range(0, len(windows), batch_size):
        x = torch.as_tensor(windows[b:b + batch_size])  # (B, T)
        ref_logp = torch.log_softmax(reference(x).float(), -1)  # (B, T, V)
        logp = torch.log_softmax(model(x).float(), -1)
        match += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        n += x.numel()
    return {"greedy_match": match / n, "kl": max(0.0, kl / n)}


# ---- evaluation ------------------------------------------------------------------------------


def _eval_one(group: dict[str, Any], windows: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Worker: evaluate one MatLM run (every tier + the Mix'n'Match shapes, consistency with its
    own XL), or one seed's four baselines (each at its tier; consistency with the XL baseline)."""
    torch.set_num_threads(1)
    from matformer import load_model
    from matformer.evaluation.lm import evaluate

    kw = dict(mix_n_match=False, decode=False, speculative=False, seq_len=windows.shape[1],
              max_tokens=windows.size, batch_size=batch_size)
    rows = []
    if group["config"] != "baseline":
        model = load_model(group["runs"][0]["out"])
        L = model.config.num_hidden_layers
        rep = evaluate(model, windows, uniform_tiers=list(TIERS), plans=mix_shapes(model.base_width, L), **kw)
        for r in rep.results:
            rows.append(dict(widths=r.widths, tier=r.tier, shape=shape_of(r.widths), loss=r.loss,
                             non_embedding_params=r.non_embedding_params,
                             greedy_match=r.greedy_match, kl=r.kl_from_reference))
        return dict(config=group["config"], seed=group["seed"], rows=rows, base=model.base_width)
    models = {}
    for run in group["runs"]:
        t = run["tier"]
        models[t] = load_model(run["out"], tier=t)  # runtime width = the width it was trained at
    ref = models[0]
    for t in TIERS:
        rep = evaluate(models[t], windows, uniform_tiers=[t], **kw)
        (r,) = [r for r in rep.results if r.tier == t]
        cons = consistency(ref, models[t], windows, batch_size)
        rows.append(dict(widths=r.widths, tier=t, shape="uniform", loss=r.loss,
                         non_embedding_params=r.non_embedding_params, **cons))
    return dict(config="baseline", seed=group["seed"], rows=rows, base=ref.base_width)


def summarize(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per config and per width: loss / params / consistency over seeds; the claims' comparisons."""
    by: dict[str, dict[tuple[int, ...], dict[str, Any]]] = {}
    for ev in evals:
        for r in ev["rows"]:
            slot = by.setdefault(ev["config"], {}).setdefault(tuple(r["widths"]), {
                "widths": r["widths"], "tier": r["tier"], "shape": r["shape"],
                "non_embedding_params": r["non_embedding_params"], "loss": [], "greedy_match": [],
                "kl": [], "seeds": []})
            slot["loss"].append(r["loss"])
            slot["greedy_match"].append(r["greedy_match"])
            slot["kl"].append(r["kl"])
            slot["seeds"].append(ev["seed"])
    table: dict[str, list[dict[str, Any]]] = {}
    for cfg, rows in by.items():
        table[cfg] = []
        for r in sorted(rows.values(), key=lambda r: (-r["non_embedding_params"], r["shape"], r["widths"])):
            table[cfg].append({**r, "loss_stats": spread(r["loss"]),
                               "greedy_match_stats": spread(r["greedy_match"]),
                               "kl_stats": spread(r["kl"])})

    def tier_row(cfg: str, t: int) -> dict[str, Any] | None:
        for r in table.get(cfg, []):
            if r["tier"] == t and r["shape"] == "uniform":
                return r
        return None

    claims: dict[str, Any] = {"loss_vs_baseline": {}, "xl_upweighting_vs_uniform": {},
                              "consistency_vs_baseline": {}, "mix_n_match": {}}
    for cfg in ("matlm_uniform", "matlm_xl", "joint"):
        out = {}
        for t in TIERS:
            b, m = tier_row("baseline", t), tier_row(cfg, t)
            if b and m:
                out[TIER_NAMES[t]] = compare(b["loss"], m["loss"], names=("baseline", cfg))
        claims["loss_vs_baseline"][cfg] = out
        cons = {}
        for t in TIERS[1:]:
            b, m = tier_row("baseline", t), tier_row(cfg, t)
            if b and m:
                cons[TIER_NAMES[t]] = {
                    "greedy_match": compare(b["greedy_match"], m["greedy_match"], lower_is_better=False,
                                            names=("baseline", cfg)),
                    "kl": compare(b["kl"], m["kl"], names=("baseline", cfg))}
        claims["consistency_vs_baseline"][cfg] = cons
        # Mix'n'Match: at each parameter count between two tiers, each shape's loss.
        groups: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for r in table.get(cfg, []):
            if r["shape"] != "uniform":
                groups.setdefault(r["non_embedding_params"], {}).setdefault(r["shape"], []).append(r)
        mm = []
        for params, shapes in sorted(groups.items()):
            nd = shapes.get("non-decreasing")
            if not nd:
                continue
            best_nd = min(nd, key=lambda r: r["loss_stats"]["mean"])
            entry = {"non_embedding_params": params, "non_decreasing": best_nd["widths"],
                     "non_decreasing_loss": best_nd["loss_stats"], "others": []}
            for shape, rs in shapes.items():
                if shape == "non-decreasing":
                    continue
                for r in rs:
                    entry["others"].append({"shape": shape, "widths": r["widths"],
                                            "loss": r["loss_stats"],
                                            "vs_non_decreasing": compare(best_nd["loss"], r["loss"],
                                                                         names=("non-decreasing", shape)),
                                            "vs_non_decreasing_paired": compare_paired(
                                                best_nd["loss"], r["loss"], names=("non-decreasing", shape))})
            mm.append(entry)
        claims["mix_n_match"][cfg] = mm
    for t in TIERS:
        u, x = tier_row("matlm_uniform", t), tier_row("matlm_xl", t)
        if u and x:
            claims["xl_upweighting_vs_uniform"][TIER_NAMES[t]] = compare(u["loss"], x["loss"],
                                                                          names=("uniform", "xl-upweighted"))
    return {"table": table, "claims": claims}


# ---- printing and plots ----------------------------------------------------------------------


def _pm(st: dict[str, float], scale: float = 1.0, nd: int = 3) -> str:
    return (f"{st['mean'] * scale:.{nd}f} [{st['min'] * scale:.{nd}f}, {st['max'] * scale:.{nd}f}]")


def format_tables(summary: dict[str, Any]) -> str:
    table = summary["table"]
    lines = ["Loss per width (mean [min, max] over seeds), consistency with XL "
             "(greedy match %, KL nats/pos; baselines vs the XL baseline)", ""]
    head = f"{'config':<15} {'width':<6} {'non-emb':>9} {'val loss':>26} {'match %':>24} {'KL':>26}"
    lines += [head, "-" * len(head)]
    for cfg in CONFIGS:
        for r in table.get(cfg, []):
            if r["shape"] != "uniform":
                continue
            lines.append(f"{cfg:<15} {TIER_NAMES[r['tier']]:<6} {r['non_embedding_params']:>9,} "
                         f"{_pm(r['loss_stats']):>26} {_pm(r['greedy_match_stats'], 100, 1):>24} "
                         f"{_pm(r['kl_stats'], 1, 3):>26}")
    lines += ["", "Verdicts (tie = difference not larger than the seed spread):"]
    c = summary["claims"]
    for cfg, rows in c["loss_vs_baseline"].items():
        lines.append(f"  loss {cfg} vs baseline: " + ", ".join(
            f"{k} {v['delta']:+.3f}±{v['spread']:.3f} {v['verdict']}" for k, v in rows.items()))
    lines.append("  loss xl-upweighted vs uniform: " + ", ".join(
        f"{k} {v['delta']:+.3f}±{v['spread']:.3f} {v['verdict']}"
        for k, v in c["xl_upweighting_vs_uniform"].items()))
    for cfg, rows in c["consistency_vs_baseline"].items():
        lines.append(f"  greedy match {cfg} vs baseline: " + ", ".join(
            f"{k} {100 * v['greedy_match']['delta']:+.1f} pts {v['greedy_match']['verdict']}"
            for k, v in rows.items()))
    for cfg, groups in c["mix_n_match"].items():
        for key, what in (("vs_non_decreasing", "unpaired"), ("vs_non_decreasing_paired", "paired by seed")):
            wins = [o[key]["verdict"] for g in groups for o in g["others"]]
            lines.append(f"  Mix'n'Match {cfg} ({what}): non-decreasing vs other shapes at equal "
                         f"params: {wins.count('non-decreasing better')} better, {wins.count('tie')} "
                         f"ties, {len(wins) - wins.count('non-decreasing better') - wins.count('tie')} worse")
    return "\n".join(lines)


_COLORS = {"baseline": "#444444", "matlm_uniform": "#1f77b4", "matlm_xl": "#d62728", "joint": "#2ca02c"}
_SHAPE_LABELS = {"non-decreasing": "non-decreasing (least slope)", "decreasing": "decreasing",
                 "other": "alternating"}
_SHAPE_MARKERS = {"non-decreasing": ("D", "#ff7f0e"), "decreasing": ("v", "#9467bd"),
                  "other": ("x", "#8c564b")}


def _errbar(ax, rows, key, scale, **kw):
    xs = [r["non_embedding_params"] for r in rows]
    st = [r[key + "_stats"] for r in rows]
    ys = [s["mean"] * scale for s in st]
    lo = [(s["mean"] - s["min"]) * scale for s in st]
    hi = [(s["max"] - s["mean"]) * scale for s in st]
    return ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, **kw)


def make_plots(summary: dict[str, Any], folder: Path, suffix: str, subtitle: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda x, _p: f"{x / 1e3:.0f}K")
    table = summary["table"]
    paths = []

    def tiers_of(cfg):
        return sorted((r for r in table.get(cfg, []) if r["shape"] == "uniform"),
                      key=lambda r: r["non_embedding_params"])

    # 1. loss vs non-embedding params: every config's tiers, plus uniform MatLM's Mix'n'Match.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.8), constrained_layout=True)
    for cfg in CONFIGS:
        rows = tiers_of(cfg)
        if rows:
            _errbar(ax, rows, "loss", 1.0, fmt="-o", color=_COLORS[cfg], ms=6, lw=1.8,
                    label=CONFIG_LABELS[cfg])
    for r in tiers_of("baseline"):
        ax.annotate(TIER_NAMES[r["tier"]], (r["non_embedding_params"], r["loss_stats"]["mean"]),
                    textcoords="offset points", xytext=(0, 10), ha="center", fontsize=10,
                    fontweight="bold")
    ax.set_title("Validation loss per width (error bars: min..max over seeds)")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.xaxis.set_major_formatter(fmt)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5)

    # Mix'n'Match of the uniform MatLM on the same axes (means over seeds, no bars: see right).
    cfg = "matlm_uniform"
    for shape, (marker, color) in _SHAPE_MARKERS.items():
        pts = [r for r in table.get(cfg, []) if r["shape"] == shape]
        if pts:
            ax.scatter([r["non_embedding_params"] for r in pts], [r["loss_stats"]["mean"] for r in pts],
                       marker=marker, color=color, s=22, zorder=3,
                       label=f"MatLM uniform Mix'n'Match, {_SHAPE_LABELS[shape]}")
    ax.legend(fontsize=8)

    # Right: each Mix'n'Match point relative to the same model's (same seed's) trained-widths
    # curve, linearly interpolated in parameters: seed-to-seed offsets cancel, shapes compare.
    tier_rows = tiers_of(cfg)
    for shape, (marker, color) in _SHAPE_MARKERS.items():
        pts = [r for r in table.get(cfg, []) if r["shape"] == shape]
        if not pts or not tier_rows:
            continue
        dx = {"non-decreasing": -0.012, "decreasing": 0.0, "other": 0.012}[shape]
        xs, ys, lo, hi = [], [], [], []
        for r in pts:
            rel = []
            for sd, loss in zip(r["seeds"], r["loss"], strict=True):
                curve = [(t["non_embedding_params"], dict(zip(t["seeds"], t["loss"], strict=True))[sd])
                         for t in tier_rows]
                rel.append(loss - float(np.interp(r["non_embedding_params"], *zip(*curve, strict=True))))
            m = sum(rel) / len(rel)
            xs.append(r["non_embedding_params"] * (1 + dx))
            ys.append(m)
            lo.append(m - min(rel))
            hi.append(max(rel) - m)
        ax2.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=color, ms=6, capsize=2, lw=0.8,
                     label=f"Mix'n'Match {_SHAPE_LABELS[shape]}", zorder=3)
    ax2.axhline(0, color=_COLORS[cfg], lw=2, label="trained widths (interpolated)")
    for t in tier_rows:
        ax2.axvline(t["non_embedding_params"], color="#bbbbbb", lw=0.8, ls=":")
        ax2.annotate(TIER_NAMES[t["tier"]], (t["non_embedding_params"], 1.0),
                     xycoords=("data", "axes fraction"), textcoords="offset points",
                     xytext=(0, -12), ha="center", fontsize=9, color="#777777")
    ax2.set_title("Mix'n'Match (MatLM uniform) relative to its trained widths\n"
                  "same seed's curve subtracted; bars: min..max over seeds", fontsize=10)
    ax2.set_xlabel("non-embedding parameters (shapes nudged ±1% apart)")
    ax2.set_ylabel("loss − trained-widths curve (nats/token)")
    ax2.xaxis.set_major_formatter(fmt)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8.5)
    fig.suptitle(f"MatFormer at small scale: loss vs parameters{subtitle}", fontsize=13,
                 fontweight="bold")
    p = folder / f"loss_vs_params{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 2. consistency with XL: MatLM submodels vs their XL; baselines vs the XL baseline.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    for cfg in CONFIGS:
        rows = [r for r in tiers_of(cfg) if r["tier"] != 0]
        if not rows:
            continue
        _errbar(ax, rows, "greedy_match", 100.0, fmt="-o", color=_COLORS[cfg], ms=6,
                label=CONFIG_LABELS[cfg])
        _errbar(ax2, rows, "kl", 1.0, fmt="-o", color=_COLORS[cfg], ms=6, label=CONFIG_LABELS[cfg])
    for r in [r for r in tiers_of("baseline") if r["tier"] != 0]:
        ax.annotate(TIER_NAMES[r["tier"]], (r["non_embedding_params"], 100 * r["greedy_match_stats"]["mean"]),
                    textcoords="offset points", xytext=(0, -16), ha="center", fontsize=10,
                    fontweight="bold")
    ax.set_title("Greedy tokens matching the XL model (%)")
    ax2.set_title("KL(P_XL || P_width), nats per position")
    for a in (ax, ax2):
        a.set_xlabel("non-embedding parameters")
        a.xaxis.set_major_formatter(fmt)
        a.grid(alpha=0.3)
        a.legend(fontsize=8.5)
    fig.suptitle(f"Consistency with XL: MatLM submodels vs their own XL, baselines vs the XL "
                 f"baseline{subtitle}", fontsize=12, fontweight="bold")
    p = folder / f"consistency{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 3. loss difference to the baseline of the same width and seed (paired by seed).
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    base_rows = {r["tier"]: r for r in tiers_of("baseline")}
    offsets = {"matlm_uniform": -0.18, "matlm_xl": 0.0, "joint": 0.18}
    for cfg, off in offsets.items():
        xs, ys, lo, hi = [], [], [], []
        for r in tiers_of(cfg):
            b = base_rows.get(r["tier"])
            if b is None:
                continue
            bl = dict(zip(b["seeds"], b["loss"], strict=True))
            d = [m - bl[sd] for sd, m in zip(r["seeds"], r["loss"], strict=True) if sd in bl]
            if not d:
                continue
            xs.append(3 - r["tier"] + off)  # S, M, L, XL left to right
            ys.append(sum(d) / len(d))
            lo.append(ys[-1] - min(d))
            hi.append(max(d) - ys[-1])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=_COLORS[cfg], ms=7, capsize=4,
                        label=CONFIG_LABELS[cfg])
    ax.axhline(0, color="#444444", lw=1)
    ax.set_xticks(range(4), [f"{TIER_NAMES[t]}\n{base_rows[t]['non_embedding_params'] / 1e3:.0f}K"
                             if t in base_rows else TIER_NAMES[t] for t in (3, 2, 1, 0)])
    ax.set_xlabel("width (non-embedding parameters)")
    ax.set_ylabel("loss − baseline loss (nats/token)")
    ax.set_title("Below 0: better than the independently trained model of that width\n"
                 "(paired by seed; bars: min..max over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5)
    fig.suptitle(f"MatLM vs baselines, per width{subtitle}", fontsize=12, fontweight="bold")
    p = folder / f"delta_vs_baseline{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# ---- the experiment --------------------------------------------------------------------------


def run_experiment(s: Settings, log=print) -> dict[str, Any]:
    """Train every run, evaluate every model on the same held-out windows, summarise."""
    from matformer.data import text as D
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.shapes import parameter_counts

    t_start = time.time()
    hw = hardware()
    out = Path(s.out)
    prepare_out(out)
    specs = run_specs(s)
    # Longest runs first, so the parallel workers finish together.
    order = sorted(specs, key=lambda sp: -sp["train"]["steps"] * (4 if sp["config"] == "joint" else 1))
    log(f"training {len(specs)} runs ({s.jobs} in parallel); X = {s.x_tokens:,} tokens per baseline")
    t0 = time.time()
    done = pool_map(_train_one, [(sp, str(out)) for sp in order], s.jobs)
    train_wall = time.time() - t0
    runs = {d["name"]: d for d in done}
    shas = {d["tokenizer_sha256"] for d in done}
    if len(shas) != 1:
        raise SystemExit(f"error: the runs trained different tokenizers ({len(shas)} distinct "
                         f"tokenizer.json files); the losses would not be comparable")
    for sp in specs:
        sp.update(runs[sp["name"]])
        log(f"  {sp['name']:<24} {sp['train_tokens']:>10,} tokens  {sp['train_seconds']:7.1f}s  "
            f"{sp['tokens_per_second']:8.0f} tok/s")
    log(f"training done in {train_wall:.0f}s; evaluating")

    # The same held-out windows for every model: the held-out split tokenized with the (shared)
    # tokenizer, eval_windows windows evenly spaced over the split (data.heldout_windows).
    val = D.heldout_tokens(specs[0]["out"], cache_dir=s.cache_dir)
    windows = D.heldout_windows(val, s.seq_len, s.eval_windows)
    groups = []
    for seed in s.seeds:
        groups.append(dict(config="baseline", seed=seed,
                           runs=[sp for sp in specs if sp["config"] == "baseline" and sp["seed"] == seed]))
        for cfg in CONFIGS[1:]:
            groups.append(dict(config=cfg, seed=seed,
                               runs=[sp for sp in specs if sp["config"] == cfg and sp["seed"] == seed]))
    t0 = time.time()
    evals = pool_map(_eval_one, [(g, windows, 16) for g in groups], s.jobs)
    eval_wall = time.time() - t0
    summary = summarize(evals)

    # Compute accounting: forward+backward passes per width, and ~6*N*D training FLOPs (N = the
    # parameters that do matmuls at that width: non-embedding + the lm_head).
    mcfg = MatFormerConfig.from_preset(s.preset, vocab_size=s.vocab_size)
    base, L = mcfg.base, mcfg.num_hidden_layers
    compute: dict[str, Any] = {}
    for sp in specs:
        passes = tier_passes(sp, base)
        tok = s.batch_size * s.seq_len
        flops = sum(6 * (parameter_counts(mcfg, [base >> t] * L)["non_embedding"]
                         + mcfg.vocab_size * mcfg.hidden_size) * tok * n for t, n in passes.items())
        key = f"{sp['config']}-seed{sp['seed']}"
        c = compute.setdefault(key, {"steps_per_tier": {TIER_NAMES[t]: 0 for t in TIERS},
                                     "train_tokens": 0, "train_flops": 0, "train_seconds": 0.0})
        for t, n in passes.items():
            c["steps_per_tier"][TIER_NAMES[t]] += n
        c["train_tokens"] += sp["train_tokens"]
        c["train_flops"] += flops
        c["train_seconds"] += sp["train_seconds"]

    report = {
        "command": "python -m benchmarks.paper.reproduce_v1" + (" --quick" if s.quick else ""),
        "settings": {**dataclasses.asdict(s), "x_tokens": s.x_tokens},
        "model": {"preset": s.preset, "layers": L, "hidden_size": mcfg.hidden_size, "ffn_base": base,
                  "ffn_widths": {TIER_NAMES[t]: base >> t for t in TIERS},
                  "vocab_size": s.vocab_size,
                  "embedding_params": parameter_counts(mcfg)["embedding"]},
        "objectives": {
            "baseline": "single, runtime tier t (only the first B>>t FFN neurons used and updated)",
            "matlm_uniform": "sample, tier_probs uniform over tiers 0..3",
            "matlm_xl": f"sample, tier_probs {list(XL_UPWEIGHTED_PROBS)} for tiers [0,1,2,3] "
                        f"(= S/M/L/XL {list(XL_UPWEIGHTED_SML_XL)})",
            "joint": "joint, all four tiers per step, loss = mean of the four (weights 0.25), "
                     "baseline_steps steps: equal FLOPs to the four baselines together",
        },
        "tie_rule": "tie when |mean difference| <= max(min..max range over seeds of either side)",
        "eval": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                 "predicted_tokens_per_width": int(windows.shape[0] * (windows.shape[1] - 1)),
                 "data": "held-out split of the default corpus (same windows for every model)",
                 "kl": "KL(P_XL || P_width), nats per position; XL = the MatLM's own full width "
                       "for its submodels, the XL baseline for the baselines"},
        "hardware": hw,
        "wall_seconds": {"train": train_wall, "eval": eval_wall, "total": time.time() - t_start},
        "train_settings": {sp["name"]: sp["train"] for sp in specs},
        "runs": [{k: sp[k] for k in ("name", "config", "seed", "tier", "train_tokens", "train_seconds",
                                     "tokens_per_second", "final_val_loss")} for sp in specs],
        "compute": compute,
        "tokenizer_sha256": shas.pop(),
        "evals": evals,
        **summary,
    }
    return report


def _subtitle(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["model"]
    return (("QUICK mode — " if s["quick"] else "") + f"{m['layers']} layers, d_model "
            f"{m['hidden_size']}, X = {s['x_tokens']:,} tokens, seeds {s['seeds']}")


def replot(path: Path) -> int:
    """Summary, tables and plots again from a run's JSON (its raw per-seed evaluations)."""
    report = json.loads(path.read_text(encoding="utf-8"))
    report.update(summarize(report["evals"]))
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(format_tables(report))
    suffix = "-quick" if report["settings"]["quick"] else ""
    plots = make_plots(report, path.parent, suffix, "\n" + _subtitle(report))
    print(f"\nrewrote {path} and {', '.join(str(p) for p in plots)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--quick", action="store_true", help=f"tiny budget for a smoke run ({QUICK})")
    ap.add_argument("--baseline-steps", type=int, default=None, help="steps of one baseline (X)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel processes (default: 2)")
    ap.add_argument("--out", default="runs/reproduce", help="folder for the trained models")
    ap.add_argument("--results", default="docs/results", help="folder for the JSON and the plots")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="recompute the summary and plots from a previous run's JSON (no training)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    s = Settings(out=args.out, quick=args.quick)
    if args.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    if args.baseline_steps is not None:
        s.baseline_steps = args.baseline_steps
    if args.seeds is not None:
        s.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.jobs is not None:
        s.jobs = args.jobs
    if len(s.seeds) < 2:
        print("warning: fewer than 2 seeds: no spread, every difference is reported", file=sys.stderr)
    report = run_experiment(s)
    print()
    print(format_tables(report))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if s.quick else ""
    js = res / f"reproduce{suffix}.json"
    js.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plots = make_plots(report, res, suffix, "\n" + _subtitle(report))
    w = report["wall_seconds"]
    print(f"\nwrote {js} and {', '.join(str(p) for p in plots)}")
    print(f"wall time: {w['total']:.0f}s (train {w['train']:.0f}s, eval {w['eval']:.0f}s); "
          f"{report['hardware']['nproc']} CPUs ({report['hardware']['cpu']}), torch {report['hardware']['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

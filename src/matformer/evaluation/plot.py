"""Plots of an evaluation report (matplotlib, imported only when a plot is asked for).

`plot_elastic_curve(report, path)` draws the paper's elastic curve: validation loss against
non-embedding parameters for every evaluated width, the trained tiers joined by a line and
labelled, Mix'n'Match points between them, the tiers at fewer KV heads (the second elastic axis)
as one labelled line per head setting, and beside it the consistency with the full width
(greedy-token match) on the same x axis.

`plot_vit_report(report, path)` draws a MatViT evaluation: top-1 and elastic-retrieval accuracy
against non-embedding parameters (trained tiers joined and labelled, Mix'n'Match and head-reduced
settings as points) and, beside it, each setting's agreement with the full width's predictions.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from matformer.models.lm.shapes import format_count
from matformer.tiers import tier_of

_TIER_NAMES = {0: "XL", 1: "L", 2: "M", 3: "S"}  # the paper's names for g = 4 granularities
_X = "non_embedding_params"


def _mix_label(widths: list[int], base: int) -> str:
    """'2×t2 + 2×t1' for a per-layer list (counts of each width, narrow first)."""
    counts = Counter(widths)
    parts = []
    for w in sorted(counts):
        t = tier_of(base, w)
        parts.append(f"{counts[w]}×{'t' + str(t) if t is not None else str(w)}")
    return " + ".join(parts)


def plot_elastic_curve(report: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG of `report` (an `EvalReport` or its `to_dict()`) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    rows = d["results"]
    groups = {
        "tier": sorted((r for r in rows if r["kind"] == "tier"), key=lambda r: r[_X]),
        "mix": [r for r in rows if r["kind"] == "mix"],
        "custom": [r for r in rows if r["kind"] == "custom"],
        "heads": sorted((r for r in rows if r["kind"] == "heads"), key=lambda r: r[_X]),
    }
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.6, 1]}, constrained_layout=True
    )
    _loss_panel(ax, groups, rows, d["base_width"])
    _consistency_panel(ax2, groups)
    sub = (f"{d.get('source', '')} — {d.get('data', '')}, {d.get('tokens', 0):,} tokens per width"
           f"; KL = {d.get('kl_direction', '')}")
    fig.suptitle(title or "MatFormer evaluation", fontsize=13, fontweight="bold")
    fig.text(0.5, -0.02, sub, ha="center", fontsize=8, color="#555555")
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG to `path` (its folder made if needed) and close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def _series(axis: Any, groups: dict[str, list[dict]], key: str, scale: float = 1.0) -> None:
    """Mix'n'Match and requested widths as points, the trained tiers as a labelled line."""
    mixes, custom, tiers = groups["mix"], groups["custom"], groups["tier"]
    if mixes:
        axis.scatter([r[_X] for r in mixes], [r[key] * scale for r in mixes], marker="D", s=28,
                     color="#ff7f0e", zorder=3, label="Mix'n'Match (least slope)")
    if custom:
        axis.scatter([r[_X] for r in custom], [r[key] * scale for r in custom], marker="s", s=40,
                     color="#2ca02c", zorder=3, label="requested widths")
    if tiers:
        axis.plot([r[_X] for r in tiers], [r[key] * scale for r in tiers], "-o", color="#1f77b4",
                  ms=8, lw=2, zorder=4, label="trained tiers")
    for i, (heads, rs) in enumerate(_by_heads(groups.get("heads", [])).items()):
        axis.plot([r[_X] for r in rs], [r[key] * scale for r in rs], "--^", ms=7, lw=1.5,
                  color=_HEAD_COLORS[i % len(_HEAD_COLORS)], zorder=4,
                  label=f"tiers at {_heads_label(list(heads))}")


_HEAD_COLORS = ("#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf")


def _by_heads(rows: list[dict]) -> dict[tuple[int, ...], list[dict]]:
    """Rows of the 'heads' kind grouped by their KV head setting, each sorted by size."""
    out: dict[tuple[int, ...], list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r["kv_heads"]), []).append(r)
    return {k: sorted(v, key=lambda r: r[_X]) for k, v in out.items()}


def _heads_label(heads: list[int]) -> str:
    return f"{heads[0]} KV" if len(set(heads)) == 1 else "kv[" + ",".join(map(str, heads)) + "]"


def style_size_axis(axis: Any, ylabel: str, title: str) -> None:
    """An axis with non-embedding parameters on x (formatted counts), a grid and a title."""
    from matplotlib.ticker import FuncFormatter

    axis.set_xlabel("non-embedding parameters")
    axis.set_ylabel(ylabel)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_count(x)))
    axis.grid(alpha=0.3)
    axis.set_title(title)


def _loss_panel(ax: Any, groups: dict[str, list[dict]], rows: list[dict], base: int) -> None:
    """Validation loss against size, tiers labelled, perplexity on the right axis."""
    import numpy as np

    _series(ax, groups, "loss")
    x_max = max((r[_X] for r in rows), default=0)
    for r in groups["tier"]:
        t = r["tier"]
        rightmost = r[_X] == x_max  # label it leftwards: stays inside
        ax.annotate(f"tier {t}" + (f" ({_TIER_NAMES[t]})" if t in _TIER_NAMES else ""),
                    (r[_X], r["loss"]), textcoords="offset points",
                    xytext=(-8, 8) if rightmost else (6, 8), ha="right" if rightmost else "left",
                    fontsize=10, fontweight="bold", color="#1f77b4")
    # Label Mix'n'Match points only where the label has room: a label goes on a point at least
    # 15% of the x range or 12% of the y range from every point already labelled (tiers first).
    xs, ys = [r[_X] for r in rows], [r["loss"] for r in rows]
    xspan = (max(xs) - min(xs)) or 1.0
    yspan = (max(ys) - min(ys)) or 1.0
    placed = [(r[_X] / xspan, r["loss"] / yspan) for r in groups["tier"]]
    for r in groups["heads"]:  # every (tier, heads) point labelled: t1/2 KV
        ax.annotate(f"t{r['tier']}/{_heads_label(r['kv_heads'])}", (r[_X], r["loss"]),
                    textcoords="offset points", xytext=(5, -11), fontsize=7.5, color="#6a3d9a")
        placed.append((r[_X] / xspan, r["loss"] / yspan))
    for r in groups["custom"] + groups["mix"]:
        px, py = r[_X] / xspan, r["loss"] / yspan
        if all(abs(px - qx) > 0.15 or abs(py - qy) > 0.12 for qx, qy in placed):
            placed.append((px, py))
            ax.annotate(_mix_label(r["widths"], base), (r[_X], r["loss"]),
                        textcoords="offset points", xytext=(5, -12), fontsize=7.5,
                        color="#555555")
    ax.margins(x=0.12, y=0.12)
    style_size_axis(ax, "validation loss (nats/token)", "Elastic curve: one model, every width")
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    # Perplexity on the right axis of the loss plot: same curve, another unit.
    lo, hi = ax.get_ylim()
    sec = ax.secondary_yaxis("right", functions=(lambda y: np.exp(np.clip(y, None, 700)),
                                                 lambda p: np.log(np.clip(p, 1e-300, None))))
    sec.set_ylabel("perplexity")
    ax.set_ylim(lo, hi)


def _consistency_panel(ax2: Any, groups: dict[str, list[dict]]) -> None:
    """Greedy-token match with the full width against size, KL written beside each tier."""
    _series(ax2, groups, "greedy_match", 100.0)
    ax2.margins(x=0.12, y=0.1)
    style_size_axis(ax2, "greedy tokens matching the full width (%)", "Consistency with the full width")
    for r in groups["tier"]:
        ax2.annotate(f"KL {r['kl_from_reference']:.3f}", (r[_X], 100 * r["greedy_match"]),
                     textcoords="offset points", xytext=(6, -12), fontsize=8, color="#1f77b4")


# MatViT

_VIT_STYLE = {"mix": ("D", "#ff7f0e", "Mix'n'Match (least slope)"),
          "heads": ("v", "#9467bd", "fewer heads"), "custom": ("s", "#2ca02c", "requested")}


def plot_vit_report(report: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG of `report` (a `VisionEvalReport` or its `to_dict()`) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    rows = d["results"]
    tiers = sorted((r for r in rows if r["kind"] == "tier"), key=lambda r: r[_X])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.5, 1]},
                                  constrained_layout=True)
    for key, colour, label in (("top1", "#1f77b4", "top-1 (classifier)"),
                               ("retrieval", "#d62728", "1-NN retrieval vs full-width gallery")):
        ax.plot([r[_X] for r in tiers], [100 * r[key] for r in tiers], "-o", color=colour, lw=2,
                label=label)
    for r in tiers:
        ax.annotate(f"tier {r['tier']}" if r["tier"] is not None else r["name"],
                    (r[_X], 100 * r["top1"]), textcoords="offset points",
                    xytext=(4, 7), fontsize=9, color="#1f77b4")
    ax2.plot([r[_X] for r in tiers], [100 * r["agreement"] for r in tiers], "-o", color="#1f77b4",
             lw=2, label="trained tiers")
    for kind, (marker, colour, label) in _VIT_STYLE.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r[_X] for r in pts], [100 * r["top1"] for r in pts], marker=marker,
                       color=colour, s=30, zorder=3, label=f"{label}: top-1")
            ax2.scatter([r[_X] for r in pts], [100 * r["agreement"] for r in pts], marker=marker,
                        color=colour, s=30, zorder=3, label=label)
    _vit_style(ax, "accuracy on held-out images (%)", "One MatViT, every width")
    _vit_style(ax2, "predictions equal to the full width's (%)", "Agreement with the full width")
    ax.legend(fontsize=8, loc="lower right")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "MatViT evaluation", fontsize=13, fontweight="bold")
    fig.text(0.5, -0.02, f"{d.get('source', '')}: {d.get('num_images', 0)} held-out images "
             f"({d.get('data', '')}), {d.get('num_classes', 0)} classes", ha="center", fontsize=8,
             color="#555555")
    return save_figure(fig, path)


def _vit_style(axis: Any, ylabel: str, title: str) -> None:
    style_size_axis(axis, ylabel, title)
    axis.margins(x=0.1, y=0.1)

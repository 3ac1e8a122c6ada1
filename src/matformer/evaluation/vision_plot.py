"""The plot of a MatViT evaluation (matplotlib, imported only when a plot is asked for).

Left: top-1 accuracy and elastic-retrieval accuracy against non-embedding parameters, the trained
tiers joined by lines and labelled, Mix'n'Match and head-reduced settings as points. Right: the
agreement of each setting's predictions with the full width's, on the same x axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matformer.evaluation.plot import save_figure, style_size_axis

_X = "non_embedding_params"
_STYLE = {"mix": ("D", "#ff7f0e", "Mix'n'Match (least slope)"),
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
    for kind, (marker, colour, label) in _STYLE.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r[_X] for r in pts], [100 * r["top1"] for r in pts], marker=marker,
                       color=colour, s=30, zorder=3, label=f"{label}: top-1")
            ax2.scatter([r[_X] for r in pts], [100 * r["agreement"] for r in pts], marker=marker,
                        color=colour, s=30, zorder=3, label=label)
    _style(ax, "accuracy on held-out images (%)", "One MatViT, every width")
    _style(ax2, "predictions equal to the full width's (%)", "Agreement with the full width")
    ax.legend(fontsize=8, loc="lower right")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "MatViT evaluation", fontsize=13, fontweight="bold")
    fig.text(0.5, -0.02, f"{d.get('source', '')}: {d.get('num_images', 0)} held-out images "
             f"({d.get('data', '')}), {d.get('num_classes', 0)} classes", ha="center", fontsize=8,
             color="#555555")
    return save_figure(fig, path)


def _style(axis: Any, ylabel: str, title: str) -> None:
    style_size_axis(axis, ylabel, title)
    axis.margins(x=0.1, y=0.1)

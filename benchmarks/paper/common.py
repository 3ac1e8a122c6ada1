"""What the paper reproductions share (v1 in reproduce_v1.py, v2 in reproduce_v2.py): the tier
names, the paper's XL-up-weighted probabilities, the Mix'n'Match shapes, the tie rule and the
spread over seeds, the parallel worker pool and the --out folder guard. One copy, so v1 and v2
cannot disagree on a shape or on what counts as a tie.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from matformer.tiers import least_slope_plans

TIER_NAMES = {0: "XL", 1: "L", 2: "M", 3: "S"}
TIERS = (0, 1, 2, 3)  # the library's tier order: tier 0 = XL (full width) ... tier 3 = S
# The paper's Table 6 probabilities, written in its order S, M, L, XL ...
XL_UPWEIGHTED_SML_XL = (0.17, 0.20, 0.22, 0.41)
# ... and mapped to the library's order of `trained_tiers=[0, 1, 2, 3]` (XL, L, M, S).
XL_UPWEIGHTED_PROBS = tuple(XL_UPWEIGHTED_SML_XL[3 - t] for t in TIERS)  # (0.41, 0.22, 0.20, 0.17)
MARKER = ".reproduce-runs"  # marks an --out folder as ours, so a re-run may clear it


def tier_passes(spec: dict[str, Any], base: int) -> dict[int, int]:
    """How many steps trained each tier (the library's own stateless step plan, so the sampled
    runs' realised draws are counted exactly)."""
    from matformer.training import TrainConfig, step_plan

    cfg = TrainConfig(**spec["train"])
    counts = {t: 0 for t in TIERS}
    for step in range(cfg.steps):
        for t, _w in step_plan(cfg, base, step, 0, 1):
            counts[t] += 1
    return counts


# ---- Mix'n'Match shapes ----------------------------------------------------------------------


def mix_shapes(base: int, num_layers: int) -> list[list[int]]:
    """Per-layer width lists mixing two neighbouring tiers: non-decreasing with depth (one change,
    the paper's least-slope heuristic, `matformer.tiers.least_slope_plans`), the same counts
    decreasing, and alternating."""
    out: list[list[int]] = []
    for wide in TIERS[:-1]:
        w, nw = base >> wide, base >> (wide + 1)
        for plan in least_slope_plans([nw, w], num_layers, range(1, num_layers)):
            out.append(plan)  # non-decreasing: the last k layers wide
            out.append(plan[::-1])  # decreasing
        if num_layers >= 3:
            out.append([nw if i % 2 == 0 else w for i in range(num_layers)])  # n, w, n, w ...
            out.append([w if i % 2 == 0 else nw for i in range(num_layers)])  # w, n, w, n ...
    return out


def shape_of(widths: Sequence[int]) -> str:
    """'uniform', 'non-decreasing', 'decreasing' or 'other' (alternating etc.) along depth."""
    ws = list(widths)
    if all(a == ws[0] for a in ws):
        return "uniform"
    if all(a <= b for a, b in zip(ws, ws[1:], strict=False)):
        return "non-decreasing"
    if all(a >= b for a, b in zip(ws, ws[1:], strict=False)):
        return "decreasing"
    return "other"


# ---- statistics ------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    v = [float(x) for x in values]
    return {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}


def compare(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True,
            names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Compare two sets of per-seed values. delta = mean(b) - mean(a). A tie when |delta| is not
    larger than the larger min..max range of the two sets (the seed-to-seed spread)."""
    sa, sb = spread(a), spread(b)
    delta = sb["mean"] - sa["mean"]
    noise = max(sa["max"] - sa["min"], sb["max"] - sb["min"])
    if abs(delta) <= noise + 1e-12:  # equal up to rounding counts as within the spread
        verdict = "tie"
    else:
        b_better = (delta < 0) if lower_is_better else (delta > 0)
        verdict = f"{names[1]} better" if b_better else f"{names[0]} better"
    return {"a": sa, "b": sb, "delta": delta, "spread": noise, "verdict": verdict}


def compare_paired(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True,
                   names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Compare two measurements of the SAME models (one per seed, e.g. two Mix'n'Match shapes
    cut from one trained model): d_s = b_s - a_s. A tie when |mean d| is not larger than the
    min..max range of d over seeds, or when the seeds disagree on the sign."""
    d = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    st = spread(d)
    noise = st["max"] - st["min"]
    if abs(st["mean"]) <= noise + 1e-12 or (st["min"] < 0 < st["max"]):
        verdict = "tie"
    else:
        b_better = (st["mean"] < 0) if lower_is_better else (st["mean"] > 0)
        verdict = f"{names[1]} better" if b_better else f"{names[0]} better"
    return {"delta": st["mean"], "delta_min": st["min"], "delta_max": st["max"], "spread": noise,
            "verdict": verdict}


# ---- running the experiment ---------------------------------------------------------------


def pool_map(fn: Callable[..., Any], items: list[tuple], jobs: int) -> list[Any]:
    """`fn(*item)` for every item, in order: in this process for `jobs <= 1`, else in `jobs`
    spawned processes (spawn, not fork: torch's threads do not survive a fork)."""
    if jobs <= 1:
        return [fn(*it) for it in items]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(fn, *it) for it in items]
        return [f.result() for f in futures]


def prepare_out(out: Path) -> None:
    """An empty --out folder marked as ours; refuses to clear a folder this script did not make."""
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise SystemExit(f"error: {out} exists and was not made by this script; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("trained models of benchmarks/paper/reproduce_v*.py; safe to delete\n")

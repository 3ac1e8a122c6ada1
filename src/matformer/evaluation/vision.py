"""Evaluate every width of one MatViT: top-1, agreement with the full width, speed, retrieval.

`evaluate_vit(model, heldout)` runs each selected setting (default: every FFN tier the model
can run, least-slope Mix'n'Match plans between neighbouring tiers, optionally fewer heads) on the
same held-out images and reports, per setting:

- top-1 accuracy of the classifier;
- agreement: the fraction of images whose predicted class equals the full width's;
- elastic retrieval: the held-out images are embedded once by the reference (the widest stored
  setting) as the gallery; each image, embedded by this setting, is a query; the 1-nearest
  neighbour by cosine similarity among the *other* gallery images (leave-one-out: a query's own
  image is not in the gallery, or the reference would trivially find itself) gives a predicted
  class; the accuracy of those predictions is `retrieval`. It tests whether a small width keeps
  the reference's metric space (the MatViT claim), not only its decisions;
- non-embedding parameters and images/s of the evaluation forward at that setting.

`cross_retrieval(query_model, gallery_model, images)` is the same measure between two models,
for the independently trained baselines (query by baseline S, gallery by baseline XL).
The library returns data; printing and plotting live with the CLI and `evaluation.plot`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from matformer.data.images import DIGITS, Images, heldout_fraction, load_split, read_normalisation
from matformer.data.text import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, training_settings
from matformer.errors import CheckpointError, DataError
from matformer.io.checkpoint import load_model
from matformer.io.source import Source, resolve_source
from matformer.models.registry import IMAGE_CLASSIFICATION
from matformer.models.vit.model import MatViT
from matformer.tiers import describe_widths, mix_n_match_plans, runnable_tiers, uniform_tier

BATCH_SIZE = 256


@dataclass
class VisionSetting:
    """One setting to evaluate: per-layer FFN widths and heads."""

    name: str
    kind: str
    """'tier' (a uniform FFN tier at full heads), 'mix' (least-slope Mix'n'Match), 'heads' (a
    tier with fewer heads) or 'custom' (a requested or stored setting that is none of these)."""
    widths: list[int]
    kv_heads: list[int]


@dataclass
class VisionWidthResult:
    name: str
    kind: str
    widths: list[int]
    kv_heads: list[int]
    tier: int | None
    non_embedding_params: int
    top1: float
    agreement: float
    """Fraction of images whose predicted class equals the reference's."""
    retrieval: float
    """Leave-one-out 1-NN (cosine) accuracy of this setting's queries against the reference's
    gallery."""
    images_per_s: float


@dataclass
class VisionEvalReport:
    num_images: int
    num_classes: int
    base_width: int
    base_kv_heads: int
    reference: str
    results: list[VisionWidthResult] = field(default_factory=list)
    source: str = ""
    data: str = ""
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- which settings ----------------------------------------------------------------------------

def select_settings(model: MatViT, uniform_tiers: Sequence[int] | None = None,
                    plans: Sequence[Sequence[int] | int] | None = None,
                    kv_heads: Sequence[int] | None = None,
                    mix_n_match: bool = True) -> list[VisionSetting]:
    """The reference (stored setting) first, then `uniform_tiers` (default: every tier the model
    can run, at most 4), least-slope Mix'n'Match plans between neighbouring tiers, each tier at
    each of `kv_heads` heads, and the extra width `plans`; duplicates dropped."""
    base, stored = model.base_width, model.stored_widths
    stored_heads = model.stored_kv_heads
    if uniform_tiers is None:
        uniform_tiers = runnable_tiers(base, stored, limit=4)
    ref_tier = uniform_tier(base, stored)
    chosen = [VisionSetting(describe_widths(base, stored), "tier" if ref_tier is not None else "custom",
                            stored, stored_heads)]
    tiers = sorted(set(uniform_tiers))
    for t in tiers:
        ws = model.resolve_widths(tier=t)
        chosen.append(VisionSetting(describe_widths(base, ws), "tier", ws, stored_heads))
    if mix_n_match:
        for ws in mix_n_match_plans(base, len(stored), tiers):
            chosen.append(VisionSetting(describe_widths(base, ws), "mix", model.resolve_widths(widths=ws),
                                        stored_heads))
    for g in kv_heads or []:
        hl = model.resolve_kv_heads(kv_heads=g)
        for t in tiers:
            ws = model.resolve_widths(tier=t)
            chosen.append(VisionSetting(f"{describe_widths(base, ws)}, {g} heads", "heads", ws, hl))
    for w in plans or []:
        ws = model.resolve_widths(widths=w)
        chosen.append(VisionSetting(describe_widths(base, ws), "custom", ws, stored_heads))
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    unique = []
    for s in chosen:
        key = (tuple(s.widths), tuple(s.kv_heads))
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


# ---- measures ----------------------------------------------------------------------------------

@torch.inference_mode()
def embed_images(model: MatViT, images: np.ndarray | torch.Tensor,
                 batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, hidden) and logits (N, labels) of `images` at the model's active setting."""
    x = torch.as_tensor(images)
    device = model.classifier.weight.device
    embs, logits = [], []
    for i in range(0, len(x), batch_size):
        e = model.embed(x[i:i + batch_size].to(device))
        embs.append(e.float())
        logits.append(model.classifier(e).float())
    return torch.cat(embs).cpu(), torch.cat(logits).cpu()


def nearest_neighbour_accuracy(queries: torch.Tensor, query_labels: np.ndarray | torch.Tensor,
                               gallery: torch.Tensor, gallery_labels: np.ndarray | torch.Tensor,
                               leave_one_out: bool = False) -> float:
    """Fraction of queries whose most cosine-similar gallery item has the query's label.
    `leave_one_out`: queries and gallery are the same images in the same order, and query i may
    not retrieve gallery item i."""
    q = F.normalize(queries.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1)
    sim = q @ g.T  # (Nq, Ng)
    if leave_one_out:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError("leave-one-out needs the queries and the gallery to be the same images")
        sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(dim=1)
    gl = torch.as_tensor(np.asarray(gallery_labels))
    ql = torch.as_tensor(np.asarray(query_labels))
    return float((gl[nearest] == ql).float().mean())


def cross_retrieval(query_model: MatViT, gallery_model: MatViT, images: Images,
                    batch_size: int = BATCH_SIZE) -> float:
    """Leave-one-out 1-NN accuracy of `query_model`'s embeddings of `images` against
    `gallery_model`'s embeddings of the same images (each at its active setting)."""
    queries, _ = embed_images(query_model, images.images, batch_size)
    gallery, _ = embed_images(gallery_model, images.images, batch_size)
    return nearest_neighbour_accuracy(queries, images.labels, gallery, images.labels, leave_one_out=True)


def _timed_pass(model: MatViT, images: np.ndarray, batch_size: int, repeats: int) -> tuple[float, tuple]:
    """Images/s of the best of `repeats` evaluation passes, and the outputs of the last one."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = embed_images(model, images, batch_size)
        best = min(best, time.perf_counter() - t)
    assert out is not None
    return len(images) / best, out


def evaluate_vit(model: MatViT, heldout: Images, *, uniform_tiers: Sequence[int] | None = None,
                 plans: Sequence[Sequence[int] | int] | None = None,
                 kv_heads: Sequence[int] | None = None, mix_n_match: bool = True,
                 batch_size: int = BATCH_SIZE, repeats: int = 2) -> VisionEvalReport:
    """Every selected setting on the same held-out images (see the module docstring)."""
    settings = select_settings(model, uniform_tiers, plans, kv_heads, mix_n_match)
    previous = model.setting
    was_training = model.training
    model.eval()
    labels = torch.as_tensor(heldout.labels)
    report = VisionEvalReport(num_images=len(heldout), num_classes=len(heldout.class_names),
                              base_width=model.base_width, base_kv_heads=model.base_kv_heads,
                              reference=settings[0].name, source=heldout.source, data=heldout.source,
                              threads=torch.get_num_threads())
    try:
        gallery = ref_pred = None
        for s in settings:
            model.set_widths(widths=s.widths, layer_kv_heads=s.kv_heads)
            speed, (emb, logits) = _timed_pass(model, heldout.images, batch_size, repeats)
            pred = logits.argmax(dim=1)
            if gallery is None:  # the reference comes first
                gallery, ref_pred = emb, pred
            report.results.append(VisionWidthResult(
                name=s.name, kind=s.kind, widths=s.widths, kv_heads=s.kv_heads,
                tier=uniform_tier(model.base_width, s.widths),
                non_embedding_params=model.num_parameters_at(s.widths, s.kv_heads)["non_embedding"],
                top1=float((pred == labels).float().mean()),
                agreement=float((pred == ref_pred).float().mean()),
                retrieval=nearest_neighbour_accuracy(emb, heldout.labels, gallery, heldout.labels,
                                                     leave_one_out=True),
                images_per_s=speed))
    finally:
        model.set_widths(**previous)
        model.train(was_training)
    return report


# ---- a checkpoint ------------------------------------------------------------------------------

def checkpoint_heldout(source: Source, model: MatViT, data: str | os.PathLike | None = None) -> Images:
    """The held-out images a checkpoint's training scored: its train_config.json names the data
    and split, its preprocessor_config.json the normalisation (`data` overrides the images)."""
    settings = training_settings(source.folder)
    norm = read_normalisation(source.folder)
    cfg = model.config
    recorded = settings.get("data")
    if data is None and recorded not in (None, DIGITS):
        # As for text: a checkpoint's metadata never chooses a local path to read; the user does.
        raise DataError(f"{source.folder / 'train_config.json'}: the run trained on "
                        f"{str(recorded)[:200]!r}; a checkpoint's settings do not choose local "
                        f"files to read. Pass --data with the image folder to evaluate on")
    split = load_split(data if data is not None else recorded, cfg.image_size,
                       cfg.num_channels,
                       heldout_fraction=heldout_fraction(settings.get("val_fraction", DEFAULT_VAL_FRACTION)),
                       seed=int(settings.get("split_seed", DEFAULT_SPLIT_SEED)), normalisation=norm)
    if len(split.heldout.class_names) != cfg.num_labels:
        raise CheckpointError(f"{source.describe()}: the model has {cfg.num_labels} classes, the "
                              f"data {len(split.heldout.class_names)}; pass the --data it was trained on")
    return split.heldout


def evaluate_checkpoint(src: str | os.PathLike | Source, *, data: str | os.PathLike | None = None,
                        uniform_tiers: Sequence[int] | None = None,
                        plans: Sequence[Sequence[int] | int] | None = None,
                        kv_heads: Sequence[int] | None = None, mix_n_match: bool = True,
                        batch_size: int = BATCH_SIZE, device: str | None = None,
                        repeats: int = 2) -> VisionEvalReport:
    """`evaluate_vit` of a MatViT checkpoint on the held-out images its training used."""
    source = resolve_source(src, companions=True)
    if source.family.task != IMAGE_CLASSIFICATION:
        raise CheckpointError(f"{source.describe()}: not an image classifier (a {source.family.name} "
                              f"checkpoint, model_type {source.config.to_dict().get('model_type')!r})")
    model = load_model(source, device=device)
    heldout = checkpoint_heldout(source, model, data)
    report = evaluate_vit(model, heldout, uniform_tiers=uniform_tiers, plans=plans,
                          kv_heads=kv_heads, mix_n_match=mix_n_match, batch_size=batch_size,
                          repeats=repeats)
    report.source = source.spec
    return report

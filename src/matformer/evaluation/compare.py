"""Several checkpoints, tier by tier, on the same held-out windows: `matformer eval A --compare B,C`.

The use it was made for (issue 17): a dense model's naive truncation (the dense checkpoint at
tier t keeps its first neurons in their original order), the importance-ordered truncation
(`matformer convert`'s output at tier t) and the model after nested distillation, side by side.
Every checkpoint is scored by `evaluation.evaluate` (loss and KL from its own full width) on the
same windows: the held-out part of `data`, else of the corpus the first checkpoint that records
its training was trained on (`corpus_to_score`; a transformers source records none, its
distilled MatFormer does), split as that training split it (`data.splits`). The checkpoints
must share a tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from matformer.data import text as D
from matformer.data.splits import HELD_OUT, CorpusPart, corpus_name, corpus_part, recorded_split
from matformer.data.token_files import is_prepared
from matformer.data.vocabulary import difference
from matformer.errors import DataError
from matformer.evaluation.lm import EvalReport, evaluate
from matformer.io.source import Source, resolve_source
from matformer.models.registry import non_embedding_parameters
from matformer.tiers import runnable_tiers


@dataclass
class Comparison:
    data: str
    """What was scored: the corpus, the part of it and how it was split (`data.splits`)."""
    split: str
    """The part of the corpus scored: 'held-out' (default) or 'all'."""
    seq_len: int
    windows: int
    tiers: list[int]
    widths: list[int]
    """FFN width of each tier (of the first checkpoint's base)."""
    non_embedding_params: list[int]
    checkpoints: list[str]
    losses: list[list[float]] = field(default_factory=list)
    """losses[i][k]: checkpoint i at tiers[k], nats per token."""
    kl_from_full: list[list[float]] = field(default_factory=list)
    """KL(P_own full width || P_tier), nats per position."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corpus_to_score(sources: Sequence[Source], data: str | os.PathLike | None
                    ) -> tuple[str | os.PathLike | None, str]:
    """(the corpus to score, why that one): `data` if given, else the one the first checkpoint
    that records its training (train_config.json) trained on, so a transformers source (no
    record) compared with its distilled MatFormer is scored on the distillation corpus's held-out
    part; the default corpus only when no checkpoint records one."""
    if data is not None:
        return data, "--data"
    for s in sources:
        if D.training_settings(s.folder):
            return D.training_data(s.folder), f"the corpus {s.describe()} was trained on"
    return None, "no checkpoint records its training data (pass --data to choose)"


def _windows(sources: Sequence[Source], data: str | os.PathLike | None, seq_len: int | None,
             max_tokens: int | None, split: str, say: Callable[[str], None]
             ) -> tuple[np.ndarray, CorpusPart]:
    first = sources[0]
    corpus, why = corpus_to_score(sources, data)
    folders = [s.folder for s in sources]
    settings, _ = recorded_split(corpus, folders)
    default_len, n = D.heldout_shape(settings)
    seq_len = min(seq_len or default_len, first.config.max_position_embeddings)
    if max_tokens is not None:
        n = max(1, max_tokens // seq_len)
    if not is_prepared(corpus):  # (a prepared folder's errors stay one line)
        say(f"tokenizing the {split} part of {corpus_name(corpus)} ({why}) ...")
    part = corpus_part(corpus, D.load_tokenizer(first.folder), split, checkpoints=folders,
                       tokenizer_file=first.folder / "tokenizer.json")
    say(f"data: {part.description}")
    return D.heldout_windows(part.tokens, seq_len, n), part


def _same_tokenizer(sources: Sequence[Source]) -> None:
    """Every checkpoint tokenizes as the first does, compared by content (vocabulary, merges,
    added tokens, normalizer, pre-tokenizer: `data.vocabulary`), never by bytes: a
    transformers-saved tokenizer.json and our compact copy of the same tokenizer are equal."""
    first = D.load_tokenizer(sources[0].require_tokenizer().parent)
    for s in sources[1:]:
        why = difference(first, D.load_tokenizer(s.require_tokenizer().parent))
        if why is not None:
            raise DataError(f"{s.describe()}: its tokenizer differs from "
                            f"{sources[0].describe()}'s ({why}); --compare needs checkpoints "
                            f"that tokenize alike")


def compare(ckpts: Sequence[str | os.PathLike], *, tiers: Sequence[int] | None = None,
            data: str | os.PathLike | None = None, seq_len: int | None = None,
            max_tokens: int | None = None, batch_size: int = 8, device: str | None = None,
            dtype: str | None = None, revision: str | None = None, split: str = HELD_OUT,
            progress: Callable[[str], None] | None = None) -> Comparison:
    """Per-tier loss of each checkpoint in `ckpts` on the same windows: the `split` part
    ('held-out' by default, or 'all') of `data`, else of the corpus `corpus_to_score` picks."""
    say = progress or (lambda _m: None)
    sources = [resolve_source(c, revision=revision if i == 0 else None, companions=True)
               for i, c in enumerate(ckpts)]
    _same_tokenizer(sources)
    cfg = sources[0].config
    if tiers is None:
        tiers = runnable_tiers(cfg.base, cfg.layer_widths, limit=4)
    tiers = sorted(set(tiers))
    windows, part = _windows(sources, data, seq_len, max_tokens, split, say)
    widths = [cfg.base >> t for t in tiers]
    out = Comparison(data=part.description, split=part.part, seq_len=int(windows.shape[1]), windows=int(windows.shape[0]),
                     tiers=list(tiers), widths=widths,
                     non_embedding_params=[non_embedding_parameters(cfg, [w] * cfg.num_hidden_layers)
                                           for w in widths],
                     checkpoints=[s.describe() for s in sources])
    for s in sources:
        say(f"evaluating {s.describe()} at tiers {list(tiers)}")
        report = evaluate(s, windows, uniform_tiers=tiers, mix_n_match=False, decode=False,
                          speculative=False, seq_len=out.seq_len, max_tokens=int(windows.size),
                          batch_size=batch_size, device=device, dtype=dtype, progress=progress)
        by_tier = _by_tier(report)
        out.losses.append([by_tier[t].loss for t in tiers])
        out.kl_from_full.append([by_tier[t].kl_from_reference for t in tiers])
    return out


def _by_tier(report: EvalReport) -> dict[int, Any]:
    return {r.tier: r for r in report.results if r.kind == "tier" and r.tier is not None}

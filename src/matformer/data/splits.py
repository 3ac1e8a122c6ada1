"""Which part of a corpus a verb reads: held-out text for scoring, training text for calibration.

Held out means held out (issue 24): `matformer eval` scored all of `--data builtin:kjv`, 95% of
it training text, and `convert --calibration` read the held-out part too. Every corpus now has
one deterministic split, the one `matformer train` makes (`text.split_texts`: `val_fraction` of
the documents, seeded), and every verb says which part it reads:

- scoring (`eval`, `eval --compare`): the **held-out** part; `part="all"` scores the whole corpus
  (text nothing was trained or calibrated on, e.g. a file kept apart by hand);
- calibration (`convert`) and training: the **train** part.

The split of a corpus is the one recorded by a checkpoint that trained on it (its
train_config.json: `val_fraction`, `split_seed`, `max_corpus_bytes`), else the defaults
(5% of the documents, seed 0), so `eval --data builtin:kjv` of a model trained with
`--data builtin:kjv --val-fraction 0.1` scores exactly that run's held-out documents. A
`matformer prepare-data` folder carries its split as files (train.bin / val.bin). `None` is the
default corpus (the Python standard library's source).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matformer.data import text as D
from matformer.data import token_files as TF
from matformer.errors import ConfigError, DataError

HELD_OUT, TRAIN, ALL = "held-out", "train", "all"
PARTS = (HELD_OUT, TRAIN, ALL)


@dataclass(frozen=True)
class CorpusPart:
    """Tokens of one part of a corpus and what they are (printed, and recorded in reports)."""

    tokens: np.ndarray
    part: str
    """'held-out', 'train' or 'all'."""
    data: str
    """The corpus: a path, a packaged corpus name, or 'default corpus (...)'."""
    description: str
    """One line: the part, how the split was made, the corpus, the token count."""

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "data": self.data, "description": self.description,
                "tokens": int(len(self.tokens))}


def corpus_name(data: str | os.PathLike | None) -> str:
    return "the default corpus (Python standard library)" if data is None else str(data)


DEFAULT_CORPUS_NAME = "builtin:python"
"""The default corpus's name (`data=None` and this name read the same documents)."""


def same_corpus(a: str | os.PathLike | None, b: Any) -> bool:
    """`a` and `b` name the same corpus: both the default corpus, the same packaged name, or
    paths of the same file or folder."""
    a, b = (None if str(x) == DEFAULT_CORPUS_NAME else x for x in (a, b))
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(b, (str, os.PathLike)):
        return False
    if str(a) in D.PACKAGED_CORPORA or str(b) in D.PACKAGED_CORPORA:
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def recorded_split(data: str | os.PathLike | None, checkpoints: Sequence[str | os.PathLike]
                   ) -> tuple[dict[str, Any], str | None]:
    """(the split settings of `data`, the checkpoint folder they come from): those recorded by
    the first of `checkpoints` whose training ran on `data`, else ({}, None): the defaults."""
    for ckpt in checkpoints:
        settings = D.training_settings(ckpt)
        if settings and same_corpus(data, settings.get("data")):
            return settings, str(ckpt)
    return {}, None


def corpus_part(data: str | os.PathLike | None, tokenizer: Any, part: str, *,
                checkpoints: Sequence[str | os.PathLike] = (),
                tokenizer_file: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> CorpusPart:
    """`part` ('held-out', 'train' or 'all') of the corpus `data` tokenized with `tokenizer`.

    A prepared token folder gives val.bin / train.bin (its tokenizer must be `tokenizer`,
    checked against `tokenizer_file`'s name in the error); text is split as its training split it
    (`recorded_split` over `checkpoints`, else the defaults)."""
    if part not in PARTS:
        raise ConfigError(f"the data split must be one of {', '.join(PARTS)}, got {part!r}")
    name = corpus_name(data)
    if TF.is_prepared(data):
        train, val = TF.load_for(data, tokenizer, tokenizer_file)
        if part == HELD_OUT and not len(val):
            raise DataError(f"{data}: the token folder holds no held-out split (val.bin is empty); "
                            f"prepare it with a --val-fraction, or score all of it with --split all")
        tokens = {HELD_OUT: val, TRAIN: train}.get(part)
        if tokens is None:
            tokens = np.concatenate([np.asarray(train), np.asarray(val)])
        how = {HELD_OUT: "its val.bin", TRAIN: "its train.bin", ALL: "train.bin + val.bin"}[part]
        return CorpusPart(tokens, part, name,
                          f"{part} part of {name} (prepared token folder: {how}), "
                          f"{len(tokens):,} tokens")
    settings, origin = recorded_split(data, checkpoints)
    texts = D.load_texts(data, max_bytes=settings.get("max_corpus_bytes"))
    if part == ALL:
        chosen, how = texts, f"all {len(texts)} documents, no split"
    else:
        fraction = float(settings.get("val_fraction", D.DEFAULT_VAL_FRACTION))
        seed = int(settings.get("split_seed", D.DEFAULT_SPLIT_SEED))
        try:
            train, val = D.split_texts(texts, fraction, seed)
        except DataError as e:
            raise DataError(f"{name}: {e}; score all of it with --split all") from None
        chosen = val if part == HELD_OUT else train
        how = (f"{len(chosen)} of {len(texts)} documents; split {fraction:g} seed {seed}, "
               + (f"as {origin}'s training" if origin else "the default split"))
    tokens = D.tokenize(tokenizer, chosen, cache_dir)
    return CorpusPart(tokens, part, name, f"{part} part of {name} ({how}), {len(tokens):,} tokens")

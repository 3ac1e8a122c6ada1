"""data.splits: one deterministic split per corpus; scoring reads the held-out part, calibration
the train part, and a checkpoint's recorded split wins for the corpus it trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matformer.data import splits
from matformer.data import text as D
from matformer.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("splits")
    docs = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(30)) for i in range(40)]
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = D.train_tokenizer(docs, 300)
    return {"root": d, "path": path, "docs": docs, "tok": tok}


def test_parts_are_train_splits_and_disjoint(corpus) -> None:
    tok, path, docs = corpus["tok"], corpus["path"], corpus["docs"]
    train, val = D.split_texts(docs)
    held = splits.corpus_part(path, tok, splits.HELD_OUT)
    fit = splits.corpus_part(path, tok, splits.TRAIN)
    whole = splits.corpus_part(path, tok, splits.ALL)
    assert np.array_equal(held.tokens, D.tokenize(tok, val))
    assert np.array_equal(fit.tokens, D.tokenize(tok, train))
    assert len(held.tokens) + len(fit.tokens) == len(whole.tokens)
    assert held.description.startswith("held-out part of ") and "2 of 40 documents" in held.description
    assert fit.to_dict()["part"] == "train" and whole.part == "all"
    with pytest.raises(ConfigError, match="split must be one of"):
        splits.corpus_part(path, tok, "test")


def test_a_checkpoint_records_the_split_of_the_corpus_it_trained_on(corpus, tmp_path) -> None:
    tok, path, docs = corpus["tok"], corpus["path"], corpus["docs"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "train_config.json").write_text(json.dumps(
        {"data": str(path), "val_fraction": 0.25, "split_seed": 3}))
    _, val = D.split_texts(docs, 0.25, 3)
    held = splits.corpus_part(path, tok, splits.HELD_OUT, checkpoints=[ckpt])
    assert np.array_equal(held.tokens, D.tokenize(tok, val)) and str(ckpt) in held.description
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text())
    # another corpus (even with the same text) keeps the default split
    assert len(splits.corpus_part(other, tok, splits.HELD_OUT, checkpoints=[ckpt]).tokens) \
        == len(splits.corpus_part(path, tok, splits.HELD_OUT).tokens)


def test_corpus_names() -> None:
    assert splits.same_corpus(None, "builtin:python") and splits.same_corpus("builtin:kjv",
                                                                            "builtin:kjv")
    assert not splits.same_corpus("builtin:kjv", None)
    assert "builtin:python" in D.PACKAGED_CORPORA


def test_too_short_to_split_names_the_way_out(corpus, tmp_path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(DataError, match="--split all"):
        splits.corpus_part(one, corpus["tok"], splits.HELD_OUT)
    assert len(splits.corpus_part(one, corpus["tok"], splits.ALL).tokens) > 0

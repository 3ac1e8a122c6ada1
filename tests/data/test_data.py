"""Data: corpora, held-out split, tokenizer (loaded by transformers' AutoTokenizer), token cache,
resumable window sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matformer.data import text as data
from matformer.errors import DataError

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" * 8 for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(DOCS, 300)


def test_default_corpus_is_stdlib_deterministic_and_capped():
    files = data.default_corpus_files(max_bytes=200_000)
    assert files == data.default_corpus_files(max_bytes=200_000)
    assert all(f.suffix == ".py" for f in files)
    texts = data.load_texts(None, max_bytes=200_000)
    assert 0 < sum(len(t) for t in texts) < 200_000 + 200_000  # cap + at most one file over
    assert any("def " in t for t in texts)


def test_load_texts_file_folder_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "doc two"}) + "\n")
    (tmp_path / ".hidden").write_text("skipped")
    assert data.load_texts(tmp_path / "a.txt") == ["hello world\n"]
    assert data.load_texts(tmp_path) == ["hello world\n", "doc one", "doc two"]


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "emptydir", "badjsonl"])
def test_bad_data_errors_name_the_path(tmp_path, case):
    p = tmp_path / "x.txt"
    if case == "empty":
        p.write_text("  \n")
    elif case == "binary":
        p.write_bytes(b"\xff\xfe\x00bad")
    elif case == "emptydir":
        p = tmp_path / "d"
        p.mkdir()
    elif case == "badjsonl":
        p = tmp_path / "x.jsonl"
        p.write_text("{not json}\n")
    with pytest.raises(DataError, match=str(p.name)):
        data.load_texts(p)


def test_split_is_deterministic_by_document():
    tr, va = data.split_texts(DOCS, 0.1, seed=3)
    assert (tr, va) == data.split_texts(DOCS, 0.1, seed=3)
    assert len(va) == 4 and len(tr) == 36 and not set(tr) & set(va)
    assert data.split_texts(DOCS, 0.1, seed=4)[1] != va
    one_tr, one_va = data.split_texts(["line\n" * 100], 0.1)
    assert one_tr[0] + one_va[0] == "line\n" * 100 and one_va[0].startswith("line")


def test_tokenizer_roundtrip_and_autotokenizer(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    assert [tok.token_to_id(s) for s in data.SPECIAL_TOKENS] == [0, 1, 2]
    data.save_tokenizer(tok, tmp_path)
    # A Llama config.json beside it must not make AutoTokenizer rewrite the pipeline.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def g(y):\n    return y  # ünïcode\n"
    ours = data.load_tokenizer(tmp_path).encode(text).ids
    assert hf(text)["input_ids"] == ours == tok.encode(text).ids
    assert hf.decode(ours) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)


def test_tokenize_caches(tmp_path, tok):
    arr = data.tokenize(tok, DOCS[:5], tmp_path)
    assert arr.dtype == np.uint16 and (arr == data.EOS_ID).sum() >= 5
    cached = list((tmp_path / "tokens").glob("*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), arr)
    np.testing.assert_array_equal(data.tokenize(tok, DOCS[:5], tmp_path), arr)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    data.tokenize(tok, DOCS[:6], tmp_path)  # other data, other key
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2


def test_window_sampler_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a = data.WindowSampler(tokens, 16, seed=1)
    first = a.next(50)  # crosses an epoch boundary (~60 windows per epoch)
    state = a.state()
    rest = a.next(40)
    b = data.WindowSampler(tokens, 16, seed=1)
    b.load_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(b.next(40), rest)
    assert first.shape == (50, 16) and a.epoch >= 1
    # every window is a contiguous run of the stream
    assert (np.diff(rest, axis=1) == 1).all()
    with pytest.raises(DataError):
        data.WindowSampler(np.arange(10), 16, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        data.WindowSampler(tokens, 8, seed=1).load_state(state)


def test_heldout_windows_are_spread_over_the_whole_split(tok):
    w = data.heldout_windows(np.arange(1000), 16, max_windows=4)
    assert w.shape == (4, 16) and w.dtype == np.int64
    assert w[:, 0].tolist() == [0, 250, 500, 750]  # one per quarter, not the first 64 tokens
    assert (np.diff(w, axis=1) == 1).all()  # each a contiguous run of the stream
    every = data.heldout_windows(np.arange(1000), 16, max_windows=None)  # as many as fit
    assert len(every) == 62 and (np.diff(every[:, 0]) >= 16).all()  # never overlapping
    assert every[-1, -1] < 1000
    np.testing.assert_array_equal(data.heldout_windows(np.arange(1000), 16, 4), w)  # fixed
    with pytest.raises(DataError, match="fewer than one window"):
        data.heldout_windows(np.arange(10), 16)
    val = data.default_eval_tokens(tok, max_bytes=100_000)
    _, val_texts = data.split_texts(data.load_texts(None, max_bytes=100_000))
    np.testing.assert_array_equal(val, data.tokenize(tok, val_texts))


def test_heldout_shape_is_what_the_run_evaluated(tmp_path):
    assert data.training_settings(tmp_path) == {}
    assert data.heldout_shape({}) == (data.HELDOUT_SEQ_LEN, data.HELDOUT_WINDOWS)
    (tmp_path / "train_config.json").write_text(json.dumps({"seq_len": 32, "eval_windows": 8}))
    assert data.heldout_shape(data.training_settings(tmp_path)) == (32, 8)
    (tmp_path / "train_config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="train_config.json"):
        data.training_settings(tmp_path)


def test_datasets_folder_needs_datasets(tmp_path):
    try:
        import datasets
    except ImportError:
        (tmp_path / "state.json").write_text("{}")
        (tmp_path / "dataset_info.json").write_text("{}")
        with pytest.raises(DataError, match="datasets"):
            data.load_texts(tmp_path)
        return
    ds = datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert data.load_texts(tmp_path / "ds") == ["first doc", "second doc"]

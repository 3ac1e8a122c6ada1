"""Pre-tokenized token files: a corpus tokenized once, then read memory-mapped by training.

`matformer prepare-data SRC -o DIR` (`prepare(src, out, ...)`) streams the documents of SRC
through the tokenizer and writes

    DIR/tokens.json       what DIR holds: dtype, token and document counts, split, source
    DIR/train.bin         the training split: raw little-endian token ids, each document
    DIR/val.bin           followed by </s> (uint16, or uint32 for vocabularies over 65535)
    DIR/tokenizer.json    (+ tokenizer_config.json, special_tokens_map.json)

SRC is a text file, a JSONL file (one {"text": ...} per line), a Parquet or Arrow file (a
`text` column, read with pyarrow in record batches), a folder of any of these (recursive,
sorted, hidden files skipped), or a dataset saved with Hugging Face `datasets.save_to_disk`
(its Arrow files, read with pyarrow; `datasets` itself is not needed). Documents are never all
in memory: they are read, tokenized (`encode_batch`, in parallel in the tokenizers library) and
appended a batch at a time, with a progress bar. The held-out split is per document and
streaming: document i goes to val.bin when the i-th draw of a generator seeded with
`split_seed` is below `val_fraction`. The tokenizer is given (`--tokenizer`: a tokenizer.json or
a folder holding one, e.g. a checkpoint) or a byte-level BPE trained on the first
`tokenizer_sample_bytes` of the training documents.

`matformer train --data DIR` then memory-maps the two files (`load`): nothing is tokenized
again, and data loader workers read windows straight from the page cache. `matformer eval CKPT
--data DIR` scores windows of val.bin (`eval_tokens`, after checking that DIR's tokenizer is the
checkpoint's), as does `matformer eval CKPT` of a checkpoint trained on DIR
(`checkpoint_heldout`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from matformer.data import text as D
from matformer.data.vocabulary import difference
from matformer.errors import DataError
from matformer.io.atomic import atomic_write, fsync_dir
from matformer.io.metadata import Fields, file_size_matches, read_json

META = "tokens.json"
FORMAT = "matformer-tokens"
_TABLE_SUFFIXES = (".parquet", ".arrow")


def is_prepared(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / META).is_file()


# ---- reading documents -------------------------------------------------------------------------


def _hf_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or a DatasetDict's train split);
    its dataset_dict.json and state.json checked (metadata.Fields) before any file is opened."""
    if (folder / "dataset_dict.json").is_file():
        f = Fields(read_json(folder / "dataset_dict.json", DataError, "datasets split list"),
                   str(folder / "dataset_dict.json"), DataError)
        splits = f.d.get("splits")
        if (not isinstance(splits, list) or not splits
                or not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..")
                           for s in splits)):
            raise f.fail("splits", splits, "a non-empty list of split names")
        folder = folder / ("train" if "train" in splits else sorted(splits)[0])
        if not folder.is_dir():
            raise DataError(f"{folder}: the split listed in dataset_dict.json is missing")
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    f = Fields(read_json(folder / "state.json", DataError, "datasets state"),
               str(folder / "state.json"), DataError)
    files = f.d.get("_data_files")
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) and e["filename"]
            and Path(e["filename"]).name == e["filename"] for e in files):
        raise f.fail("_data_files", files, 'a list of {"filename": NAME} (files in the folder)')
    if not files:
        raise DataError(f"{folder / 'state.json'}: lists no data files")
    paths = [folder / e["filename"] for e in files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: listed in {folder / 'state.json'} but missing")
    return paths


def source_files(src: Path) -> list[Path]:
    if not src.exists():
        raise DataError(f"{src}: no such file or folder (prepare-data takes text, JSONL, Parquet "
                        f"or Arrow files, a folder of them, or a datasets save_to_disk folder)")
    if src.is_file():
        return [src]
    hf = _hf_dataset_files(src)
    if hf is not None:
        return hf
    files = sorted(p for p in src.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not files:
        raise DataError(f"{src}: the folder holds no files")
    return files


def _table_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet/Arrow needs pyarrow (pip install "
                        f"'matformer[data]')") from None
    try:
        if path.suffix == ".parquet":
            batches = pq.ParquetFile(str(path)).iter_batches(columns=["text"], batch_size=4096)
        else:  # datasets' Arrow files are IPC streams; plain .arrow files may be IPC files
            try:
                batches = iter(pa.ipc.open_stream(str(path)))
            except pa.ArrowInvalid:
                batches = iter(pa.ipc.open_file(str(path)).iter_batches())
        for batch in batches:
            if "text" not in batch.schema.names:
                raise DataError(f"{path}: no 'text' column (columns: {batch.schema.names})")
            yield from (t for t in batch.column("text").to_pylist() if isinstance(t, str))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def documents(src: str | os.PathLike) -> Iterator[str]:
    """Every non-empty document of `src`, in order."""
    for path in source_files(Path(src)):
        if path.suffix in _TABLE_SUFFIXES:
            docs: Any = _table_documents(path)
        else:
            docs = D._read_file(path)  # text or JSONL, with data.py's checks and messages
        for d in docs:
            if d.strip():
                yield d


# ---- writing -----------------------------------------------------------------------------------


def _tokenizer(tokenizer: str | os.PathLike | None, src: Path, vocab_size: int,
               sample_bytes: int, val_fraction: float, split_seed: int):
    if tokenizer is not None:  # a folder holding tokenizer.json (a checkpoint), or the file
        path = Path(tokenizer)
        if path.is_dir():
            return D.load_tokenizer(path)
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception
            raise DataError(f"{path}: not a tokenizer.json ({e})") from None
    sample, size = [], 0
    for doc, is_val in _split(documents(src), val_fraction, split_seed):
        if not is_val:
            sample.append(doc)
            size += len(doc)
            if size >= sample_bytes:
                break
    if not sample:
        raise DataError(f"{src}: no training documents to train a tokenizer on")
    return D.train_tokenizer(sample, vocab_size)


def _split(docs: Iterator[str], val_fraction: float, seed: int) -> Iterator[tuple[str, bool]]:
    rng = np.random.default_rng([seed, 0x70C])
    for d in docs:
        yield d, bool(rng.random() < val_fraction)


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
            vocab_size: int = 32000, tokenizer_sample_bytes: int = 100_000_000,
            val_fraction: float = D.DEFAULT_VAL_FRACTION, split_seed: int = D.DEFAULT_SPLIT_SEED,
            batch_docs: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Tokenize `src` into the folder `out` (see the module docstring); returns tokens.json."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another -o (nothing was "
                        f"changed)")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer is None:
        D.check_vocab_size(vocab_size)  # before a byte is read: tokenizers aborts on ~10^8
    files = source_files(src)
    tok = _tokenizer(tokenizer, src, vocab_size, tokenizer_sample_bytes, val_fraction, split_seed)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    try:
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc=f"tokenizing {src.name}", disable=not progress)
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            sinks = {"train": ftrain, "val": fval}
            batch: list[tuple[str, bool]] = []
            for item in _split(documents(src), val_fraction, split_seed):
                batch.append(item)
                if len(batch) >= batch_docs:
                    _write_batch(tok, batch, sinks, counts, dtype, bar)
                    batch = []
            _write_batch(tok, batch, sinks, counts, dtype, bar)
            for f in sinks.values():
                f.flush()
                os.fsync(f.fileno())
        bar.close()
        if counts["train"][0] == 0 or counts["val"][0] == 0:
            raise DataError(f"{src}: the split left no {'training' if not counts['train'][0] else 'held-out'} "
                            f"documents ({counts['train'][1]} / {counts['val'][1]}); use more "
                            f"data or another val_fraction")
        D.save_tokenizer(tok, tmp)
        meta = {"format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name,
                "train_tokens": counts["train"][0], "val_tokens": counts["val"][0],
                "train_documents": counts["train"][1], "val_documents": counts["val"][1],
                "vocab_size": tok.get_vocab_size(), "source": str(src.absolute()),
                "val_fraction": val_fraction, "split_seed": split_seed}
        atomic_write(tmp / META, json.dumps(meta, indent=2) + "\n")
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_batch(tok, batch: list[tuple[str, bool]], sinks: dict[str, Any],
                 counts: dict[str, list[int]], dtype: Any, bar: Any) -> None:
    if not batch:
        return
    encs = tok.encode_batch([d for d, _ in batch], add_special_tokens=False)
    for (_, is_val), enc in zip(batch, encs, strict=True):
        split = "val" if is_val else "train"
        ids = np.asarray(enc.ids + [D.EOS_ID], dtype=dtype)
        ids.tofile(sinks[split])
        counts[split][0] += len(ids)
        counts[split][1] += 1
    bar.update(sum(len(d.encode("utf-8", errors="replace")) for d, _ in batch))


# ---- reading -----------------------------------------------------------------------------------


_MAX_TOKENS = 2**48  # no token file is larger; a bigger count is damage


def read_meta(folder: Path) -> dict[str, Any]:
    """tokens.json of a prepared folder, checked: format, a dtype that holds the vocabulary
    (uint16 up to 65536 tokens, else uint32), non-negative counts. The sizes of train.bin and
    val.bin are checked against the counts by `load`."""
    f = Fields(read_json(folder / META, DataError, "token folder metadata"), str(folder / META),
               DataError)
    if f.d.get("format") != FORMAT:
        raise DataError(f"{folder / META}: not a matformer token folder (format {FORMAT!r})")
    dtype = f.choice("dtype", ("uint16", "uint32"))
    vocab = f.integer("vocab_size", lo=1, hi=2**32)
    if dtype == "uint16" and vocab > 2**16:
        raise f.fail("dtype", dtype, f"uint32 for vocab_size {vocab} (over 65536)")
    for split in ("train", "val"):
        f.integer(f"{split}_tokens", lo=0, hi=_MAX_TOKENS)
        f.integer(f"{split}_documents", lo=0, hi=_MAX_TOKENS, default=0)
    return f.d


def load(folder: str | os.PathLike) -> tuple[Any, np.ndarray, np.ndarray, dict[str, Any]]:
    """(tokenizer, train tokens, held-out tokens, tokens.json) of a prepared folder; the token
    arrays are read-only memory maps."""
    folder = Path(folder)
    meta = read_meta(folder)
    arrays = []
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        path, n = folder / f"{split}.bin", meta[f"{split}_tokens"]
        file_size_matches(path, n, dtype.itemsize, DataError,
                          f"{folder / META} records {n} {dtype.name} tokens; the folder is "
                          f"incomplete or damaged, prepare it again")
        # an empty file cannot be memory-mapped: a split without tokens is an empty array
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
    tok = D.load_tokenizer(folder)
    if tok.get_vocab_size() != meta["vocab_size"]:
        raise DataError(f"{folder / META}: vocab_size {meta['vocab_size']} but "
                        f"{folder / 'tokenizer.json'} has {tok.get_vocab_size()} tokens; the "
                        f"folder is damaged, prepare it again")
    for split, tokens in zip(("train", "val"), arrays, strict=True):
        check_token_ids(tokens, meta["vocab_size"], folder / f"{split}.bin")
    return tok, arrays[0], arrays[1], meta


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str | os.PathLike) -> None:
    """A DataError naming `source` and its largest id when a token id is past the vocabulary
    (the embedding lookup would otherwise fail with an IndexError deep inside the model)."""
    if len(tokens) == 0:
        return
    top = int(tokens.max())  # one pass over the memory map, no copy
    if top >= vocab_size:
        raise DataError(f"{source}: token id {top} is past the vocabulary of {vocab_size} "
                        f"tokens; the file was written for another tokenizer or is damaged "
                        f"(prepare the data again)")


def load_for(folder: str | os.PathLike, tokenizer: Any | None,
             tokenizer_file: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) tokens of a prepared folder read for a model whose tokenizer is
    `tokenizer` (None: not checked): it must be the one the folder was prepared with, else a
    DataError naming the folder's tokenizer.json and `tokenizer_file` (the model's)."""
    folder = Path(folder)
    tok, train, val, _ = load(folder)
    why = None if tokenizer is None else difference(tokenizer, tok)
    if why is not None:
        theirs = tokenizer_file or "the given tokenizer"
        raise DataError(f"{folder / 'tokenizer.json'} differs from {theirs} ({why}): the token folder was "
                        f"prepared with another tokenizer; prepare it again with "
                        f"`matformer prepare-data SRC -o NEW --tokenizer {theirs}`")
    return train, val


def eval_tokens(folder: str | os.PathLike, tokenizer: Any | None = None,
                tokenizer_file: str | os.PathLike | None = None) -> np.ndarray:
    """The tokens `matformer eval --data DIR` scores: the held-out split (val.bin) of a prepared
    folder, or its whole stream when it holds none (tokenizer checked as `load_for`)."""
    train, val = load_for(folder, tokenizer, tokenizer_file)
    return val if len(val) else train


def checkpoint_heldout(ckpt_dir: str | os.PathLike) -> np.ndarray:
    """The held-out tokens a checkpoint was trained beside (what `matformer eval CKPT` scores):
    the val.bin of the prepared folder its run trained on, else `data.heldout_tokens`."""
    ckpt = Path(ckpt_dir)
    trained_on = D.training_data(ckpt)
    if is_prepared(trained_on):
        return eval_tokens(trained_on, D.load_tokenizer(ckpt), ckpt / "tokenizer.json")
    return D.heldout_tokens(ckpt)

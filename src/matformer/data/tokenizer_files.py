"""A tokenizer's own files, kept with the tokenizer object so that they travel intact.

Why: a `tokenizers.Tokenizer` knows its vocabulary, merges and added tokens, but not which token
is its BOS, EOS or padding, its `model_max_length` or its chat template: those live in the files
beside tokenizer.json (tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
generation_config.json). Rewriting them from our own defaults (`<s>`, `</s>`, `<pad>`, a max
length of the run's --seq-len) gave a transformers user of a run started from SmolLM2 a pad id
past the embedding, an EOS the model never produces and silent truncation.

So whoever reads a tokenizer from a folder (`data.text.load_tokenizer`) records its files here
(`attach`), byte for byte; whoever writes a tokenizer (`data.text.save_tokenizer`: a training
run's checkpoints, a prepared token folder) writes those bytes back unchanged when there are
any (`files_of`), and our own defaults only for a tokenizer trained here. The record is a side
table keyed weakly by the tokenizer object: nothing is added to the object itself.

`special_ids(tok)` and `eos_id(tok)` read the recorded tokenizer_config.json (then
generation_config.json) to answer what the token ids of its specials are: the document
separator appended between training documents is the tokenizer's own EOS.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any

from matformer.errors import DataError
from matformer.io.files import is_regular, read_bytes

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""The files that make up a tokenizer as transformers saves it (plus the generation settings
that name its end-of-sequence ids)."""

OWN_SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
"""The special tokens of a tokenizer trained here (`data.text.train_tokenizer`)."""

_MAX_COMPANION_BYTES = 64 << 20  # tokenizer.json has its own cap (data.text.MAX_TOKENIZER_BYTES)

_FILES: weakref.WeakKeyDictionary[Any, dict[str, bytes]] = weakref.WeakKeyDictionary()
_ORIGIN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def read_files(folder: str | os.PathLike, tokenizer_json: bytes | None = None) -> dict[str, bytes]:
    """The tokenizer files present in `folder`, as bytes (regular files only; a FIFO or a
    device there is skipped, never waited on). `tokenizer_json`: tokenizer.json's bytes when the
    caller has read them already."""
    folder = Path(folder)
    files: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        if name == TOKENIZER_JSON and tokenizer_json is not None:
            files[name] = tokenizer_json
            continue
        path = folder / name
        if name != TOKENIZER_JSON and is_regular(path):
            files[name] = read_bytes(path, limit=_MAX_COMPANION_BYTES, error=DataError)
    return files


def attach(tok: Any, files: dict[str, bytes], origin: str | os.PathLike = "") -> Any:
    """Record `files` (name -> bytes, tokenizer.json among them; read from the folder `origin`,
    for messages) as `tok`'s own; returns `tok`."""
    _FILES[tok] = dict(files)
    _ORIGIN[tok] = os.fspath(origin)
    return tok


def files_of(tok: Any) -> dict[str, bytes] | None:
    """The files `tok` was read from (see `attach`), or None for a tokenizer built here."""
    return _FILES.get(tok)


def _json(tok: Any, name: str) -> dict[str, Any]:
    raw = (files_of(tok) or {}).get(name)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        where = Path(_ORIGIN.get(tok) or ".") / name
        raise DataError(f"{where}: not valid JSON; fix or remove it") from None
    return obj if isinstance(obj, dict) else {}


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_config(tok: Any) -> dict[str, Any]:
    """The recorded tokenizer_config.json (empty for a tokenizer built here)."""
    return _json(tok, "tokenizer_config.json")


def generation_config(tok: Any) -> dict[str, Any]:
    """The recorded generation_config.json (empty when there is none)."""
    return _json(tok, "generation_config.json")


def special_ids(tok: Any) -> dict[str, int]:
    """{"bos"/"eos"/"pad"/"unk": id} of the specials the tokenizer's files name (each present in
    its vocabulary); a tokenizer built here: `<s>`, `</s>`, `<pad>`."""
    files = files_of(tok)
    if files is None:
        names = dict(OWN_SPECIALS)
    else:
        cfg = tokenizer_config(tok)
        smap = _json(tok, "special_tokens_map.json")
        names = {}
        for key in ("bos", "eos", "pad", "unk"):
            name = _content(cfg.get(f"{key}_token")) or _content(smap.get(f"{key}_token"))
            if name is not None:
                names[key] = name
    ids = {}
    for key, name in names.items():
        i = tok.token_to_id(name)
        if i is not None:
            ids[key] = int(i)
    return ids


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _config_eos(tok: Any) -> list[int]:
    """The `eos_token_id` of the model config.json beside the tokenizer's files, if any."""
    origin = _ORIGIN.get(tok)
    path = Path(origin) / "config.json" if origin else None
    if path is None or not is_regular(path):
        return []
    try:
        obj = json.loads(read_bytes(path, limit=_MAX_COMPANION_BYTES, error=DataError))
    except (DataError, UnicodeDecodeError, ValueError):
        return []
    return _ids(obj.get("eos_token_id")) if isinstance(obj, dict) else []


def eos_id(tok: Any) -> int:
    """The tokenizer's end-of-sequence id (its tokenizer_config's `eos_token`, else the first
    of generation_config's `eos_token_id`, else the model config.json's beside it, else `</s>`):
    what ends each training document."""
    found = special_ids(tok).get("eos")
    if found is not None:
        return found
    for ids in (_ids(generation_config(tok).get("eos_token_id")), _config_eos(tok)):
        if ids:
            return ids[0]
    own = tok.token_to_id(OWN_SPECIALS["eos"])
    if own is not None:
        return int(own)
    where = Path(_ORIGIN.get(tok) or ".") / "tokenizer.json"
    raise DataError(f"{where}: the tokenizer names no end-of-sequence token (no eos_token in "
                    f"tokenizer_config.json, no eos_token_id in generation_config.json or "
                    f"config.json, no </s>); add tokenizer_config.json with \"eos_token\"")


def stop_ids(tok: Any, config_eos: int | list[int] | None = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS, generation_config's `eos_token_id`(s)
    and the model config's (`config_eos`), in that order, without repeats."""
    out: list[int] = []
    found = special_ids(tok).get("eos")
    if found is not None:
        out.append(found)
    out += _ids(generation_config(tok).get("eos_token_id"))
    out += _ids(config_eos)
    if not out:
        own = tok.token_to_id(OWN_SPECIALS["eos"])
        if own is not None:
            out.append(int(own))
    return list(dict.fromkeys(out))


def chat_template(tok: Any) -> str | None:
    """The chat template: chat_template.jinja, else chat_template.json's or tokenizer_config's
    `chat_template` (a string, or transformers' list of named templates: the 'default' one)."""
    files = files_of(tok) or {}
    if "chat_template.jinja" in files:
        try:
            return files["chat_template.jinja"].decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("chat_template.jinja is not UTF-8 text") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = _json(tok, name).get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if isinstance(value, str):
            return value
    return None


def model_max_length(tok: Any) -> int | None:
    """tokenizer_config.json's `model_max_length`, or None."""
    value = tokenizer_config(tok).get("model_max_length")
    return value if isinstance(value, int) and not isinstance(value, bool) else None

"""Checks for the small metadata files matformer reads (training_state.json, tokens.json,
preprocessor_config.json, datasets' state.json, Gemma 3n config CSV cells): one place for the
type, range, finiteness and size rules, so every reader refuses damaged or hostile metadata with
the same one-line message (naming the file, the key and the value) instead of a traceback or,
worse, a run on garbage (a NaN std, a negative data position, a wrong dtype).

Each reader builds a `Fields` over the parsed object with the error type its callers expect
(CheckpointError for checkpoints, DataError for data) and asks for what it needs:

    f = Fields(meta, "DIR/tokens.json", DataError)
    n = f.integer("train_tokens", lo=0)
    dtype = f.choice("dtype", ("uint16", "uint32"))

No torch import: data readers and `matformer info` use this too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matformer.errors import DataError, MatFormerError
from matformer.io import files

MAX_JSON_BYTES = 64 * 2**20
"""Largest metadata JSON file read (the real ones are a few KB; a larger one is not ours)."""

MAX_NUMBER_CHARS = 64
"""Longest numeric literal accepted in a text cell (a 5000-digit number is not a size)."""

_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | os.PathLike, error: type[MatFormerError] = DataError,
              what: str = "metadata", max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `path`, read through io.files (regular files only, never blocking on
    a FIFO, size capped, strict JSON: no NaN/Infinity); `error` naming the file otherwise."""
    d = files.read_json(path, limit=max_bytes, error=error)
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object ({what}), got {type(d).__name__}")
    return d


class Fields:
    """Typed, range-checked access to one parsed metadata object; every failure is
    `error(f"{source}: {key} ...")`."""

    def __init__(self, d: Any, source: str, error: type[MatFormerError] = DataError) -> None:
        if not isinstance(d, dict):
            raise error(f"{source}: expected a JSON object, got {type(d).__name__}")
        self.d, self.source, self.error = d, source, error

    def fail(self, key: str, value: Any, expected: str) -> MatFormerError:
        return self.error(f"{self.source}: {key} is {_show(value)}; expected {expected}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.d:
            return self.d[key]
        if default is _MISSING:
            raise self.error(f"{self.source}: no {key!r} (damaged or not a matformer file)")
        return default

    def integer(self, key: str, lo: int | None = None, hi: int | None = None,
                default: Any = _MISSING) -> int:
        """An int (not a bool, not a float) within [lo, hi]."""
        return check_integer(self._get(key, default), key, self, lo, hi)

    def number(self, key: str, lo: float | None = None, hi: float | None = None,
               default: Any = _MISSING) -> float:
        """A finite int or float within [lo, hi]."""
        return check_number(self._get(key, default), key, self, lo, hi)

    def numbers(self, key: str, lo: float | None = None, hi: float | None = None,
                length: int | None = None, max_length: int = 4096) -> list[float]:
        """A non-empty list of finite numbers within [lo, hi] (of `length` when given)."""
        value = self._get(key, _MISSING)
        if not isinstance(value, list) or not value or len(value) > max_length:
            raise self.fail(key, value, f"a list of 1 to {max_length} numbers")
        if length is not None and len(value) != length:
            raise self.fail(key, value, f"{length} numbers")
        return [check_number(v, key, self, lo, hi) for v in value]

    def string(self, key: str, default: Any = _MISSING, max_length: int = 4096) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or len(value) > max_length:
            raise self.fail(key, value, "a string")
        return value

    def choice(self, key: str, choices: Iterable[Any], default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        options = list(choices)
        if isinstance(value, bool) or value not in options:
            raise self.fail(key, value, "one of " + ", ".join(map(repr, options)))
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self.fail(key, value, "a JSON object")
        return value

    def sub(self, key: str, default: Any = _MISSING) -> Fields:
        """The object under `key`, checked the same way (messages name `source: key.field`)."""
        return Fields(self.mapping(key, default), f"{self.source}: {key}", self.error)


def check_integer(value: Any, key: str, f: Fields, lo: int | None = None,
                  hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise f.fail(key, value, "an integer" + _range(lo, hi))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise f.fail(key, value, "an integer" + _range(lo, hi))
    return value


def check_number(value: Any, key: str, f: Fields, lo: float | None = None,
                 hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise f.fail(key, value, "a number" + _range(lo, hi))
    try:
        x = float(value)
    except OverflowError:
        raise f.fail(key, value, "a finite number" + _range(lo, hi)) from None
    if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        raise f.fail(key, value, "a finite number" + _range(lo, hi))
    return x


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def file_size_matches(path: Path, count: int, itemsize: int, error: type[MatFormerError],
                      hint: str) -> None:
    """`path` is a regular file of exactly `count * itemsize` bytes (a token file beside the
    count and dtype its tokens.json records)."""
    expected = count * itemsize
    try:
        ok = path.is_file() and path.stat().st_size == expected
    except OSError:
        ok = False
    if not ok:
        raise error(f"{path}: expected {count} tokens of {itemsize} byte(s) ({expected} bytes); "
                    f"{hint}")

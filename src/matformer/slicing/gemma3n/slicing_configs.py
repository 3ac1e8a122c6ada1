"""Named Gemma 3n slicing configurations from a CSV with the columns of Google's published
configs (the `google/gemma3n-slicing-configs` dataset): `name`, `# Layers`,
`# Effective Params (B)`, `MMLU PT accuracy`, `FFN Hidden Dims`, `Layers Skipped`.

`FFN Hidden Dims` lists one width per *kept* layer, written as Python-like expressions such as
`[2_048 * 4, 2_048 * 8]`; `Layers Skipped` is empty (or `null`) or a list of source layer
indices like `[20, 21, 22, 23, 24]`. Both are read by a small parser, never evaluated: integers
with single underscores between digits, `*`, `+`, parentheses and `[...]` lists, where
`list * int` repeats and `list + list` concatenates (`[2_048 * 4] * 10 + [8_192]`).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from matformer.errors import ConfigError
from matformer.io.files import read_bytes
from matformer.io.metadata import MAX_NUMBER_CHARS

NAME, LAYERS, DIMS, SKIPPED = "name", "# Layers", "FFN Hidden Dims", "Layers Skipped"
_TOKEN = re.compile(r"\s*(?:([0-9]+(?:_[0-9]+)*)|([\[\](),*+]))", re.ASCII)  # no '²', no '٣'
_MAX_CELL = 10_000  # characters in one cell; the published ones are a few hundred
_MAX_DEPTH = 32  # nested parentheses/brackets; recursion stays far below Python's limit
_MAX_CSV_BYTES = 16 * 2**20  # the published file is a few KB
_MAX_INT = 10**12  # no FFN width or layer index is larger; keeps products bounded
_MAX_ITEMS = 100_000  # no list of layers is longer; keeps repetition bounded

Value = int | list[int]


class _Parser:
    """Recursive descent over: expr := term ('+' term)*; term := atom ('*' atom)*;
    atom := INT | '(' expr ')' | '[' [expr (',' expr)* [',']] ']'."""

    def __init__(self, text: str, what: str) -> None:
        self.text, self.what = text, what
        self.depth = 0
        if len(text) > _MAX_CELL:
            raise ConfigError(f"{what}: {len(text)} characters, more than {_MAX_CELL}; not a "
                              f"slicing configuration")
        self.tokens: list[tuple[int, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None:
                self.fail(pos, f"unexpected {text[pos:].lstrip()[:1]!r}")
            self.tokens.append((m.start(1) if m.group(1) else m.start(2), m.group(1) or m.group(2)))
            pos = m.end()
        self.i = 0

    def fail(self, pos: int, why: str) -> None:
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        raise ConfigError(f"{self.what}: {why} at character {pos + 1} of {shown!r} (allowed: "
                          f"integers like 2_048, *, +, parentheses and [...] lists)")

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def pos(self) -> int:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else len(self.text)

    def take(self, tok: str) -> None:
        if self.peek() != tok:
            self.fail(self.pos(), f"expected {tok!r}")
        self.i += 1

    def parse(self) -> Value:
        if not self.tokens:
            self.fail(0, "empty expression")
        v = self.expr()
        if self.peek() is not None:
            self.fail(self.pos(), f"unexpected {self.peek()!r}")
        return v

    def expr(self) -> Value:
        v = self.term()
        while self.peek() == "+":
            at = self.pos()
            self.i += 1
            v = self.combine(v, self.term(), "+", at)
        return v

    def term(self) -> Value:
        v = self.atom()
        while self.peek() == "*":
            at = self.pos()
            self.i += 1
            v = self.combine(v, self.atom(), "*", at)
        return v

    def atom(self) -> Value:
        tok, at = self.peek(), self.pos()
        if tok is None:
            self.fail(at, "expression ends early")
        self.i += 1
        if tok in "([":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                self.fail(at, f"more than {_MAX_DEPTH} nested brackets")
            v = self.bracketed(tok, at)
            self.depth -= 1
            return v
        if tok[0].isdigit():
            if len(tok) > MAX_NUMBER_CHARS:
                self.fail(at, f"a {len(tok)}-character number")
            return self.bounded(int(tok.replace("_", "")), at)
        self.fail(at, f"unexpected {tok!r}")
        raise AssertionError  # fail() always raises

    def bracketed(self, tok: str, at: int) -> Value:
        if tok == "(":
            v = self.expr()
            self.take(")")
            return v
        if tok == "[":
            items: list[int] = []
            while self.peek() != "]":
                item = self.expr()
                if isinstance(item, list):
                    self.fail(at, "a list inside a list")
                items.append(item)  # type: ignore[arg-type]
                if self.peek() != ",":
                    break
                self.i += 1
            self.take("]")
            return items
        raise AssertionError(tok)

    def bounded(self, v: Value, at: int) -> Value:
        if isinstance(v, int) and v > _MAX_INT:
            self.fail(at, f"number {v} is too large")
        if isinstance(v, list) and len(v) > _MAX_ITEMS:
            self.fail(at, f"list of {len(v)} items is too long")
        return v

    def combine(self, a: Value, b: Value, op: str, at: int) -> Value:
        if op == "+":
            if isinstance(a, list) != isinstance(b, list):
                self.fail(at, "'+' between a list and a number")
            return self.bounded(a + b, at)  # type: ignore[operator]
        if isinstance(a, list) and isinstance(b, list):
            self.fail(at, "'*' between two lists")
        if isinstance(a, list) or isinstance(b, list):
            items, count = (a, b) if isinstance(a, list) else (b, a)
            if len(items) * count > _MAX_ITEMS:  # type: ignore[operator]
                self.fail(at, f"repeating {len(items)} items {count} times is too long a list")
        return self.bounded(a * b, at)  # type: ignore[operator]


def parse_expression(text: str, what: str = "expression") -> Value:
    """An int or a list of ints from `text` (see the module docstring); `what` names it in errors."""
    return _Parser(text, what).parse()


def parse_int_list(text: str, what: str) -> list[int]:
    v = parse_expression(text, what)
    if not isinstance(v, list):
        raise ConfigError(f"{what}: {text!r} is a number, expected a [...] list")
    return v


@dataclass(frozen=True)
class SlicingConfig:
    """One row: the width of each kept layer and the source layers skipped."""

    name: str
    widths: list[int]
    skip_layers: list[int]
    effective_params_b: str | None  # as published, for the report


def read_slicing_config(path: str | Path, name: str) -> SlicingConfig:
    """The row called `name` of the CSV file `path`, parsed and checked for consistency."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such slicing-config CSV file")
    if p.is_file() and p.stat().st_size > _MAX_CSV_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes, more than any slicing-config CSV "
                          f"({_MAX_CSV_BYTES})")
    # regular files only, size capped before reading: a FIFO is refused, never waited on
    raw = read_bytes(p, limit=_MAX_CSV_BYTES, error=ConfigError, shown=str(p))
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
        header = rows[0].keys() if rows else []
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{p}: cannot read it as CSV ({str(e).splitlines()[0][:200]})") from None
    missing = [c for c in (NAME, DIMS, SKIPPED) if c not in header]
    if missing:
        raise ConfigError(f"{p}: missing column(s) {missing}; expected Google's slicing-config "
                          f"columns {NAME!r}, {LAYERS!r}, {DIMS!r}, {SKIPPED!r}")
    found = [r for r in rows if (r.get(NAME) or "").strip() == name.strip()]
    if not found:
        names = [r.get(NAME) for r in rows]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        raise ConfigError(f"{p}: no configuration named {name!r} (column {NAME!r} has "
                          f"{names[:8]}{more})")
    if len(found) > 1:
        raise ConfigError(f"{p}: {len(found)} rows are named {name!r}; refusing to guess")
    row = found[0]
    where = f"{p}: {name!r}"
    widths = parse_int_list(row[DIMS] or "", f"{where} column {DIMS!r}")
    skipped_text = (row[SKIPPED] or "").strip()
    skipped = ([] if skipped_text.lower() in ("", "null", "none", "nan")
               else parse_int_list(skipped_text, f"{where} column {SKIPPED!r}"))
    layers_text = (row.get(LAYERS) or "").strip()
    if layers_text:
        if (not layers_text.isascii() or not layers_text.isdigit()
                or len(layers_text) > MAX_NUMBER_CHARS or int(layers_text) != len(widths)):
            raise ConfigError(f"{where}: column {LAYERS!r} says {layers_text!r} but {DIMS!r} "
                              f"lists {len(widths)} widths (one per kept layer)")
    return SlicingConfig(name, widths, skipped, row.get("# Effective Params (B)"))

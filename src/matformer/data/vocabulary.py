"""Tokenizer identity by content: do two tokenizers turn text into the same ids?

Wherever token ids cross from one side to another (a prepared token folder into a model, a
student's batches into a teacher), both sides must tokenize alike. Comparing tokenizer.json
bytes (or `to_str()`) is wrong both ways: transformers rewrites the file with other key order,
added-token flags and merges as pairs instead of "a b" strings, so the *same* tokenizer would be
refused, and a byte-equal comparison says nothing useful about why two differ. `fingerprint`
keeps exactly what decides the ids: the model (type, vocabulary, merges, unknown token and
the subword options), the added/special tokens with their ids, the normalizer and the
pre-tokenizer. Decoders and post-processors are left out: matformer encodes without special
tokens, and decoding does not change which ids a text becomes.
"""

from __future__ import annotations

import json
from typing import Any

_MODEL_KEYS = ("type", "vocab", "merges", "unk_token", "continuing_subword_prefix",
               "end_of_word_suffix", "byte_fallback", "fuse_unk", "ignore_merges", "dropout",
               "max_input_chars_per_word")


def _merge(m: Any) -> Any:
    """A BPE merge as a pair: `"a b"` (older files) and `["a", "b"]` (newer) are the same."""
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return [a, b]
    return list(m)


def fingerprint(tok: Any) -> dict[str, Any]:
    """What decides the ids a `tokenizers.Tokenizer` produces, in a canonical form."""
    d = json.loads(tok.to_str())
    model = d.get("model") or {}
    core = {k: model.get(k) for k in _MODEL_KEYS}
    if isinstance(core["merges"], list):
        core["merges"] = [_merge(m) for m in core["merges"]]
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special")))
                   for t in d.get("added_tokens") or [])
    return {"model": core, "added": added, "normalizer": d.get("normalizer"),
            "pre_tokenizer": d.get("pre_tokenizer")}


def difference(a: Any, b: Any) -> str | None:
    """None when `a` and `b` tokenize alike; else a short description of the first difference
    (for the one-line error)."""
    fa, fb = fingerprint(a), fingerprint(b)
    if fa == fb:
        return None
    ma, mb = fa["model"], fb["model"]
    if ma["type"] != mb["type"]:
        return f"model {ma['type']} vs {mb['type']}"
    if ma["vocab"] != mb["vocab"]:
        na, nb = len(ma["vocab"] or {}), len(mb["vocab"] or {})
        return f"vocabularies differ ({na} vs {nb} entries)" if na != nb else \
            "vocabularies differ (same size, other tokens or ids)"
    if ma["merges"] != mb["merges"]:
        return "merges differ"
    if fa["added"] != fb["added"]:
        return "special/added tokens differ"
    for key in ("normalizer", "pre_tokenizer"):
        if fa[key] != fb[key]:
            return f"{key.replace('_', '-')}s differ"
    return "model options differ"

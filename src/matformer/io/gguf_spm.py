"""SentencePiece-style vocabularies in GGUF (llama.cpp's `llama` tokenizer model), both ways.

Llama 2, Mistral v0.1 and Gemma ship a tokenizer.json whose model is tokenizers' BPE with
`byte_fallback` over `▁`-spelled pieces (spaces become `▁` by a Metaspace pre-tokenizer or a
Replace normalizer; characters outside the vocabulary become `<0xXX>` byte tokens). llama.cpp runs
such a vocabulary as its `llama` (SPM) tokenizer: the text with spaces escaped to `▁` (and one
prepended when `tokenizer.ggml.add_space_prefix`), split into characters, then repeatedly the
adjacent pair whose concatenation is a token with the highest `tokenizer.ggml.scores` is merged;
what is left outside the vocabulary falls back to byte tokens.

Export (`spm_spec`) writes what convert_hf_to_gguf.py's `_set_vocab_llama_hf` (gguf-py's
`LlamaHfVocab`) writes -- model `llama`, pre `default`, tokens, scores, types (byte `<0xXX>`,
control for special added tokens, user-defined for other added ones, unknown for the BPE's
`unk_token`, unused for padding rows), the special ids, `add_space_prefix` as convert's Llama and
Gemma 3 paths set it -- with one difference: `LlamaHfVocab` gives every token the placeholder
score -1000, which makes llama.cpp merge the leftmost pair first instead of in the BPE's merge
order. Here a token's score is minus the rank of the first merge that makes it, so llama.cpp's
highest-score-first order is the BPE's lowest-rank-first order. That equivalence holds when every
way of cutting a token into two vocabulary tokens is a merge (llama.cpp merges any such pair) and
the merges of one token are consecutive: true of tokenizer.json files converted from a
SentencePiece model (transformers builds their merges that way); anything else is refused, as
llama.cpp would tokenize it differently. (A Metaspace pre-tokenizer that prepends `▁` adds none
before a text that already starts with a space, where llama.cpp does: such texts tokenize
differently; the `Prepend` + `Replace` normalizer of Llama 2's tokenizer.json has no such gap.)

Rebuild (`build_spm_tokenizer`, for a .gguf SRC) mirrors transformers' GGUF loader
(`integrations/gguf/gguf_tokenizer_mapping.py`): the vocabulary as the file spells it, merges
derived from it (every split of a token into two tokens, best score first; Gemma files by token
position, with all-space tokens respelled `▁`), LlamaTokenizer's decoder, GemmaTokenizer's
Replace normalizer for `gemma3`, control and unknown tokens special, user-defined tokens added.
One difference: where transformers' LlamaTokenizer puts a Metaspace pre-tokenizer (which adds no
`▁` before a text that starts with a space), this puts the `Prepend("▁")` + `Replace(" ", "▁")`
normalizer of Llama 2's own tokenizer.json (and of transformers' Phi-3 path), which is what
llama.cpp does with `add_space_prefix` (`" hi"` -> `▁▁hi`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError

SPACE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
NO_MERGE_SCORE = -1000.0
"""The score of a token no merge makes (LlamaHfVocab's placeholder; llama.cpp never reads it)."""
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


def is_spm(obj: Any) -> bool:
    """A tokenizer.json whose model is a byte-fallback BPE (SentencePiece style)."""
    model = obj.get("model") if isinstance(obj, dict) else None
    return isinstance(model, dict) and model.get("type") == "BPE" and bool(
        model.get("byte_fallback"))


def _replace_space(n: Any) -> bool:
    return (isinstance(n, dict) and n.get("type") == "Replace"
            and n.get("pattern") == {"String": " "} and n.get("content") == SPACE)


def space_prefix(path: Path, obj: dict[str, Any]) -> bool:
    """llama.cpp's `add_space_prefix` for the tokenizer.json's space handling: Metaspace
    (prepend_scheme `first`/`always`: True, `never`: False), or a `▁` Replace normalizer with a
    `▁` Prepend before it (True) or without (False, Gemma's); anything else is refused."""
    norm, pre = obj.get("normalizer"), obj.get("pre_tokenizer")
    if norm is None and isinstance(pre, dict) and pre.get("type") == "Metaspace" \
            and pre.get("replacement", SPACE) == SPACE:
        scheme = pre.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.19 spelled it add_prefix_space
            return bool(pre.get("add_prefix_space", True))
        if scheme in ("first", "always", "never"):
            return scheme != "never"
    no_split = pre is None or (isinstance(pre, dict) and pre.get("type") == "Split"
                               and pre.get("pattern") == {"String": " "})  # Gemma: a no-op
    if no_split and _replace_space(norm):
        return False
    steps = norm.get("normalizers") if isinstance(norm, dict) and norm.get(
        "type") == "Sequence" else None
    if no_split and isinstance(steps, list) and len(steps) == 2 and isinstance(
            steps[0], dict) and steps[0].get("type") == "Prepend" and steps[0].get(
            "prepend") == SPACE and _replace_space(steps[1]):
        return True
    raise CheckpointError(
        f"{path}: a byte-fallback BPE with normalizer {norm!r} and pre_tokenizer {pre!r}: "
        f"llama.cpp's SentencePiece tokenizer only escapes spaces to '{SPACE}' (Metaspace, or a "
        f"Replace normalizer with an optional Prepend); it would split this text differently")


def _merge_pairs(path: Path, model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise CheckpointError(f"{path}: merge {m!r} is not two tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def merge_scores(path: Path, model: dict[str, Any], skip: set[str]) -> dict[str, float]:
    """{token: minus the rank of the first merge making it}, after checking that llama.cpp's
    score-ordered pair merging is this BPE (see the module docstring). `skip`: tokens that are not
    merged text (bytes, specials)."""
    vocab: dict[str, int] = model["vocab"]
    pairs = _merge_pairs(path, model)
    scores: dict[str, float] = {}
    last = None
    for rank, (left, right) in enumerate(pairs):
        token = left + right
        if token not in vocab or left not in vocab or right not in vocab:
            raise CheckpointError(f"{path}: merge {left!r} + {right!r} is not of vocabulary "
                                  f"tokens")
        if token in scores and token != last:
            raise CheckpointError(
                f"{path}: the merges making {token!r} are not consecutive (rank {rank}); "
                f"llama.cpp orders merges by one score per token and would tokenize differently")
        scores.setdefault(token, -float(rank))
        last = token
    merged = set(pairs)
    for token in vocab:
        if token in skip:
            continue
        for j in range(1, len(token)):
            left, right = token[:j], token[j:]
            if left in vocab and right in vocab and (left, right) not in merged \
                    and left not in skip and right not in skip:
                raise CheckpointError(
                    f"{path}: {left!r} + {right!r} makes the token {token!r} but is not a merge; "
                    f"llama.cpp merges every such pair and would tokenize differently (a "
                    f"tokenizer.json converted from a SentencePiece model lists them all)")
    return scores


def spm_vocab(path: Path, obj: dict[str, Any], vocab_size: int
              ) -> tuple[list[str], list[float], list[int], int | None]:
    """(tokens, scores, types, unk id) as `_set_vocab_llama_hf` lays them out, `vocab_size`
    long (rows past the tokenizer: `[PADn]`, unused)."""
    model = obj["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{path}: model.vocab is not a token -> id map")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise CheckpointError(f"{path}: a byte-fallback BPE without the byte tokens "
                              f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                              f"llama.cpp falls back to all 256")
    by_id: dict[int, str] = {int(i): t for t, i in vocab.items()}
    types: dict[int, int] = {}
    unk = model.get("unk_token")
    unk_id = vocab.get(unk) if isinstance(unk, str) else None
    for added in obj.get("added_tokens") or []:
        i = int(added["id"])
        by_id[i] = added["content"]
        types[i] = CONTROL if added.get("special") else USER_DEFINED
    if unk_id is not None:
        types[int(unk_id)] = UNKNOWN
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} does not fit the model's "
                              f"vocab_size={vocab_size} (config.json)")
    skip = {t for i, t in by_id.items() if i in types or BYTE_TOKEN.fullmatch(t)}
    scores = merge_scores(path, model, skip)
    tokens, score_list, type_list = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            score_list.append(NO_MERGE_SCORE)
            type_list.append(UNUSED)
            continue
        kind = BYTE if BYTE_TOKEN.fullmatch(token) else types.get(i, NORMAL)
        if kind == USER_DEFINED:  # as _create_vocab_sentencepiece: user-defined spaces
            token = token.replace(SPACE, " ")
        tokens.append(token)
        score_list.append(scores.get(token, NO_MERGE_SCORE) if kind == NORMAL
                          else NO_MERGE_SCORE)
        type_list.append(kind)
    return tokens, score_list, type_list, None if unk_id is None else int(unk_id)


def adds_bos_eos(obj: dict[str, Any]) -> tuple[bool, bool]:
    """(add_bos, add_eos) from a TemplateProcessing post-processor: a special token before/after
    `$A` in its `single` template (where tokenizer_config.json does not say)."""
    post = obj.get("post_processor")
    single = post.get("single") if isinstance(post, dict) and post.get(
        "type") == "TemplateProcessing" else None
    if not isinstance(single, list):
        return False, False
    kinds = ["A" if isinstance(p, dict) and "Sequence" in p else "S" for p in single]
    if "A" not in kinds:
        return False, False
    at = kinds.index("A")
    return "S" in kinds[:at], "S" in kinds[at + 1:]


# ---- rebuild ------------------------------------------------------------------------------------


def derive_merges(tokens: list[str], scores: list[float], types: list[int]
                  ) -> list[tuple[str, str]]:
    """transformers' `generate_merges`: every split of a normal token into two normal tokens,
    the best-scored token's first (ties: the longer left part first)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for token, i in vocab.items():
        local = [(token[:j], token[j:]) for j in range(1, len(token))
                 if token[:j] in vocab and token[j:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, scores[i]) for left, right in local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def build_spm_tokenizer(path: Path, tokens: list[str], scores: list[float] | None,
                        types: list[int], add_space_prefix: bool, gemma: bool) -> Any:
    """A tokenizers `Tokenizer` equal to the GGUF's `llama` vocabulary (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if gemma:  # transformers' gemma_tokenizer: spaces respelled, merges by position
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    elif scores is None:
        raise CheckpointError(f"{path}: a 'llama' vocabulary without tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens repeats a token")
    unk = next((tokens[i] for i, ty in enumerate(types) if ty == UNKNOWN), None)
    tok = Tokenizer(BPE(vocab=vocab, merges=derive_merges(tokens, scores, types), unk_token=unk,
                        fuse_unk=True, byte_fallback=True, dropout=None))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif add_space_prefix:  # a normalizer, not Metaspace: llama.cpp prepends even before " x"
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                               normalizers.Replace(" ", SPACE)])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True)
                            if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])
    return tok

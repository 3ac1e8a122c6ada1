"""SentencePiece-style tokenizers (byte-fallback BPE over `▁` pieces: Llama 2, Mistral v0.1,
Gemma) through GGUF: exported as llama.cpp's `llama` vocabulary, read back through our GGUF
source into a tokenizer.json that gives the original's ids and text; llama.cpp itself (slow)
tokenizes to the same ids and its logits (Llama) / greedy tokens (Gemma 3) are ours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer import save_model
from matformer.errors import CheckpointError
from tests.conftest import tiny_lm

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

SPACE = "\u2581"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
LINES = [f"The café {i} serves {i * 37} crêpes; naïve cooks say: hello world."
         for i in range(60)] + [f"def f{i}(x):\n    return x + {i}" for i in range(40)]
STRINGS = ["Hello world", " leading space", "  two  spaces ", "digits 0123456789 and 3.14",
           "naïve café — 東京 ✓ 🙂", "tab\tand\nnewline", "</s> in text <s>"]


def spm_tokenizer(prefix: bool, vocab: int = 420):
    """A tiny tokenizer shaped as Llama 2's (prefix: `Prepend("▁")` + `Replace(" ", "▁")`) or
    Gemma's (`Replace` only) tokenizer.json: byte-fallback BPE, `<0xXX>` byte tokens, and merges
    as transformers converts a SentencePiece model (every split of a piece into two pieces,
    grouped by the piece, in piece order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    def shaped(model):
        tok = Tokenizer(model)
        tok.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE),
                                                normalizers.Replace(" ", SPACE)])
                          if prefix else normalizers.Replace(" ", SPACE))
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        return tok

    trained = shaped(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trained.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS + BYTES, min_frequency=2, max_token_length=6,
        show_progress=False))
    ids = trained.get_vocab()
    normal = {t: i for t, i in ids.items() if i >= len(SPECIALS) + len(BYTES)}
    merges = [(t[:j], t[j:]) for t, _ in sorted(normal.items(), key=lambda x: x[1])
              for j in range(1, len(t)) if t[:j] in normal and t[j:] in normal]
    tok = shaped(models.BPE(vocab=ids, merges=merges, unk_token="<unk>", byte_fallback=True,
                            fuse_unk=True))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama-family model with a Llama 2 shaped tokenizer, exported to f32 GGUF."""
    from matformer.slicing.export import export_gguf

    root = tmp_path_factory.mktemp("spm_llama")
    tok = spm_tokenizer(prefix=True)
    save_model(tiny_lm(0, vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2),
               root / "src")
    save_tokenizer(tok, root / "src")
    export_gguf(root / "src", root / "m.gguf", outtype="f32")
    return root, tok


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tiny Gemma 3 with a Gemma shaped tokenizer (no space prefix), exported to f32 GGUF."""
    from matformer.models.gemma3.config import Gemma3Config
    from matformer.models.gemma3.model import Gemma3LM
    from matformer.slicing.export import export_gguf

    root = tmp_path_factory.mktemp("spm_gemma")
    tok = spm_tokenizer(prefix=False)
    torch.manual_seed(0)
    model = Gemma3LM(Gemma3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=5, max_position_embeddings=64, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    with torch.no_grad():  # random (1 + w) norms, so a wrongly written norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    save_model(model, root / "src")
    save_tokenizer(tok, root / "src")
    export_gguf(root / "src", root / "m.gguf", outtype="f32")
    return root, tok


def _read_back(root: Path, tmp_path: Path):
    from tokenizers import Tokenizer

    from matformer.io.gguf_source import gguf_to_checkpoint

    out = gguf_to_checkpoint(root / "m.gguf", tmp_path / "back")
    return Tokenizer.from_file(str(Path(out) / "tokenizer.json")), Path(out)


def _metadata(path: Path) -> dict:
    from matformer.io.gguf import field_value

    r = gguf.GGUFReader(path)
    return {k: field_value(r, k) for k in r.fields if k.startswith("tokenizer.ggml.")}


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_export_writes_a_llama_vocabulary_and_reads_back_to_the_same_ids(
        family, request, tmp_path, one_thread):
    root, tok = request.getfixturevalue(family)
    meta = _metadata(root / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is (family == "llama")
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is True
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # unknown, control, control
    assert types[3:259] == [6] * 256  # <0x00>..<0xFF>: byte
    assert set(types[259:]) == {1}
    scores = meta["tokenizer.ggml.scores"]
    merged = [scores[tok.token_to_id(a + b)] for a, b in
              (m if isinstance(m, list) else m.split(" ") for m in
               json.loads(tok.to_str())["model"]["merges"])]
    assert merged == sorted(merged, reverse=True)  # llama.cpp's best-first is the merge order

    back, folder = _read_back(root, tmp_path)
    for s in STRINGS:
        want = tok.encode(s, add_special_tokens=False).ids
        assert back.encode(s, add_special_tokens=False).ids == want, s
        assert back.decode(want, skip_special_tokens=False) == tok.decode(
            want, skip_special_tokens=False), s
    byte_fallback = tok.encode("東京", add_special_tokens=False).tokens
    assert all(t in BYTES for t in byte_fallback[1:])  # the text did fall back to bytes
    assert back.encode("hi").ids[0] == 1  # add_bos_token: BOS added as llama.cpp adds it
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["unk_token"] == "<unk>"
    from matformer.slicing.export import export_gguf

    export_gguf(folder, tmp_path / "again.gguf", outtype="f32")  # GGUF -> folder -> GGUF
    assert _metadata(tmp_path / "again.gguf") == meta


def test_a_bpe_llama_cpp_would_merge_differently_is_refused(tmp_path):
    """A trained BPE whose pieces can also be cut into other (unmerged) pairs: llama.cpp's
    score-ordered merging is not that BPE, so the export says so and writes nothing."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    from matformer.slicing.export import export_gguf

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS + BYTES, show_progress=False))
    save_model(tiny_lm(0, vocab_size=tok.get_vocab_size()), tmp_path / "src")
    save_tokenizer(tok, tmp_path / "src")
    with pytest.raises(CheckpointError, match="is not a merge|not consecutive"):
        export_gguf(tmp_path / "src", tmp_path / "m.gguf", outtype="f32")
    assert not (tmp_path / "m.gguf").exists()


# ---- against llama.cpp itself (slow; needs llama-cpp-python) -------------------------------------


def _llama_cpp_tokens(path: Path, strings: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [llm.tokenize(s.encode(), add_bos=False, special=True) for s in strings]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_llamacpp_tokenizes_to_the_same_ids(family, request):
    pytest.importorskip("llama_cpp")
    root, tok = request.getfixturevalue(family)
    theirs = _llama_cpp_tokens(root / "m.gguf", STRINGS)
    assert theirs == [tok.encode(s, add_special_tokens=False).ids for s in STRINGS]


@pytest.mark.slow
def test_llamacpp_logits_match_for_the_llama_family(llama):
    pytest.importorskip("llama_cpp")
    from benchmarks.speed.llamacpp import theirs
    from matformer.io.checkpoint import load_model

    root, tok = llama
    prompt = [1] + tok.encode(" ".join(STRINGS), add_special_tokens=False).ids
    _, logits, _ = theirs(root / "m.gguf", prompt, 1, threads=1, kv_type=0)
    model = load_model(root / "src", dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(logits - want).max() < 1e-4  # measured 2.4e-7 (float32 KV cache)


@pytest.mark.slow
def test_llamacpp_greedy_tokens_match_for_gemma3(gemma):
    pytest.importorskip("llama_cpp")
    from benchmarks.speed.llamacpp import theirs
    from matformer.inference.decode import generate
    from matformer.io.checkpoint import load_model

    root, tok = gemma
    prompt = [1] + tok.encode("def f3(x):\n    return", add_special_tokens=False).ids
    _, _, tokens = theirs(root / "m.gguf", prompt, 12, threads=1, kv_type=0)
    model = load_model(root / "src")
    assert len(set(tokens)) > 1  # not a degenerate run
    assert generate(model, prompt, max_new_tokens=12, ignore_eos=True).tokens == tokens


_CONVERT = """
import importlib.machinery, runpy, sys, types
sp = types.ModuleType("sentencepiece")  # imported by the converter, not needed without .model
sp.SentencePieceProcessor, sp.__spec__ = None, importlib.machinery.ModuleSpec("sentencepiece", None)
sys.modules["sentencepiece"] = sp
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


@pytest.mark.slow
def test_llamacpps_converter_writes_the_same_vocabulary_but_scores(tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (`_set_vocab_llama_hf`) on a transformers Llama
    with the same tokenizer: the same tokens, types (but `<unk>`: CONTROL there, UNKNOWN as its
    SentencePiece path and ours write it), ids and flags. Its scores are all -1000, so llama.cpp
    merges left to right there; ours follow the merge order, and only ours tokenize every string
    to the original's ids. Needs $MATFORMER_LLAMACPP_SRC (llama.cpp's source folder)."""
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    from matformer.slicing.export import export_gguf

    src = os.environ.get("MATFORMER_LLAMACPP_SRC")
    if not src or not Path(src, "convert_hf_to_gguf.py").is_file():
        pytest.skip("set MATFORMER_LLAMACPP_SRC to llama.cpp's source folder")
    tok = spm_tokenizer(prefix=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
        eos_token_id=2)).save_pretrained(tmp_path / "hf")
    save_tokenizer(tok, tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": f"{src}:{src}/gguf-py"}
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(tmp_path / "hf"), "--outfile",
                        str(tmp_path / "theirs.gguf"), "--outtype", "f32"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=src)
    assert r.returncode == 0, r.stderr[-2000:]
    export_gguf(tmp_path / "hf", tmp_path / "ours.gguf", outtype="f32")
    theirs, ours = _metadata(tmp_path / "theirs.gguf"), _metadata(tmp_path / "ours.gguf")
    assert set(theirs["tokenizer.ggml.scores"]) == {-1000.0}
    assert theirs["tokenizer.ggml.token_type"][0] == 3 and ours["tokenizer.ggml.token_type"][0] == 2
    assert theirs.get("tokenizer.ggml.add_space_prefix", True) is True  # llama.cpp's default
    for key in ("scores", "token_type", "add_space_prefix"):
        theirs.pop(f"tokenizer.ggml.{key}", None), ours.pop(f"tokenizer.ggml.{key}")
    assert theirs == ours
    want = [tok.encode(s, add_special_tokens=False).ids for s in STRINGS]
    assert _llama_cpp_tokens(tmp_path / "ours.gguf", STRINGS) == want
    assert _llama_cpp_tokens(tmp_path / "theirs.gguf", STRINGS) != want  # "  two  spaces "

